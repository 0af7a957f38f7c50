"""TLS certificates bound to a peer's DHT identity.

A peer's certificate is self-signed with its identity key (the RSA key that signs its DHT records), names the
identity as its only host name, and travels in the signed record. A reader accepts a record only if the
certificate's key is the signing key (`certificate_matches`); a connection then trusts that certificate alone
(it is the root and the leaf), so whoever answers must hold the identity key.
"""

import datetime
import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

# Fixed validity, so that a certificate is a pure function of the key (RSA PKCS#1 v1.5 signatures are deterministic):
# pinning, not dates, is what makes it trustworthy.
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(2124, 1, 1, tzinfo=datetime.timezone.utc)


class TLSIdentity:
    """A peer's certificate and private key in PEM, for its gRPC server (and the names clients check)."""

    def __init__(self, key: RSAPrivateKey, identity: str):
        private_key: rsa.RSAPrivateKey = key._private_key  # hivemind keeps the cryptography key here
        self.identity = identity
        self.certificate = make_certificate(private_key, identity)
        self.private_key_pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def make_certificate(private_key: rsa.RSAPrivateKey, identity: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@functools.lru_cache(maxsize=1024)
def certificate_matches(certificate: bytes, owner_public_key: bytes) -> bool:
    """Whether `certificate` (PEM) carries `owner_public_key` (OpenSSH bytes, as in a record's owner marker)."""
    try:
        public_key = x509.load_pem_x509_certificate(certificate).public_key()
    except ValueError:
        return False
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    return RSAPublicKey(public_key).to_bytes() == owner_public_key

"""Who a peer is in the DHT: a swarm identity derived from an RSA key, and records only that key can sign.

Every DHT node of the swarm validates records with hivemind's RSASignatureValidator: a record whose subkey
carries "[owner:<public key>]" is stored only if it is signed by that key, so nobody else can write or
overwrite it. A peer's subkey is "<identity><owner marker>", where the identity is a hash of the same public
key; readers accept a record only when the two agree, so a record claiming another peer's identity is either
rejected when stored (wrong signature) or ignored when read (identity not derived from the signing key).
"""

import hashlib
from pathlib import Path

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

IDENTITY_PREFIX = "sw"


def load_or_create_key(path: str | Path) -> RSAPrivateKey:
    """The private key kept in `path` (DER), made and saved (readable by the owner only) if the file is missing:
    a peer started with the same file keeps its identity across restarts."""
    path = Path(path).expanduser()
    if path.exists():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (un)pickling path for its keys
        return key
    key = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(key.to_bytes())
    return key


def identity_of(owner_marker: bytes) -> str:
    return IDENTITY_PREFIX + hashlib.sha256(owner_marker).hexdigest()[:40]


def own_subkey(validator: RSASignatureValidator) -> bytes:
    """The subkey under which this peer announces itself, signed with the validator's key."""
    return identity_of(validator.local_public_key).encode() + validator.local_public_key


def identity_from_subkey(subkey: object) -> str | None:
    """The identity a record's subkey proves, or None if it is unsigned or claims an identity not its key's."""
    if not isinstance(subkey, bytes):
        return None
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(subkey)
    if match is None or match.end() != len(subkey):
        return None
    marker = subkey[match.start() :]
    claimed = subkey[: match.start()].decode(errors="replace")
    return claimed if claimed == identity_of(marker) else None


def owner_public_key(subkey: object) -> bytes:
    """The public key (OpenSSH bytes) in a signed subkey's owner marker; b"" if it has none."""
    if not isinstance(subkey, bytes):
        return b""
    match = RSASignatureValidator._PUBLIC_KEY_RE.search(subkey)
    return match.group(1) if match is not None else b""


class BytesSubkeyValidator(RecordValidatorBase):
    """Rejects records whose subkey is not bytes: a text subkey among bytes ones breaks every reader of the key."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            return isinstance(MSGPackSerializer.loads(record.subkey), bytes)
        except Exception:  # not even msgpack: garbage
            return False

"""`swarm-peer` whose TLS server presents another peer's certificate and key (read from $IMPOSTOR_KEY, that peer's
--identity-path file), while its DHT records are signed with its own identity: it plays a peer that stole a key."""

import os

from hivemind.dht.crypto import RSASignatureValidator

import peer.server
from peer.cli import main
from swarm.identity import identity_of, load_or_create_key
from swarm.net.tls import TLSIdentity

_stolen_key = load_or_create_key(os.environ["IMPOSTOR_KEY"])
_stolen = TLSIdentity(_stolen_key, identity_of(RSASignatureValidator(_stolen_key).local_public_key))
_real_credentials = peer.server.server_credentials
peer.server.server_credentials = lambda _certificate, _key: _real_credentials(_stolen.certificate, _stolen.private_key_pem)

if __name__ == "__main__":
    main()

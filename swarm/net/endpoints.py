"""gRPC channels to announced peers: always TLS, pinned to the certificate in the peer's signed record, direct or
through the relay the record names.

A relayed channel asks gRPC's own HTTP CONNECT support to go through the relay (`grpc.http_proxy`); the CONNECT
target is the peer's identity, which the relay maps to the peer's standing connection (see `relay`). Direct
channels turn proxies off, so that an `http_proxy` variable in a user's environment never reroutes the swarm.
"""

from dataclasses import dataclass

import grpc

RELAY_TARGET_PORT = 443  # the CONNECT target is "<identity>:443": the relay only reads the identity


@dataclass(frozen=True)
class Endpoint:
    """Where and who a peer is: its identity, the certificate it must present, and how to dial it."""

    identity: str
    certificate: bytes  # PEM, from the peer's signed record
    address: str = ""  # host:port of its data plane, when it can be dialled directly
    relay: str = ""  # host:port of the relay that reaches it, when it cannot

    @property
    def relayed(self) -> bool:
        return bool(self.relay)

    def describe(self) -> str:
        return f"{self.identity[:10]} via relay {self.relay}" if self.relayed else f"{self.identity[:10]}@{self.address}"


def _target_and_options(endpoint: Endpoint, options: list[tuple]) -> tuple[str, grpc.ChannelCredentials, list[tuple]]:
    if not endpoint.certificate:
        raise ValueError(f"peer {endpoint.identity} announced no certificate: refusing an unauthenticated channel")
    if not (endpoint.address or endpoint.relay):
        raise ValueError(f"peer {endpoint.identity} announced no address")
    credentials = grpc.ssl_channel_credentials(root_certificates=endpoint.certificate)
    options = [*options, ("grpc.ssl_target_name_override", endpoint.identity)]
    if endpoint.relayed:
        target = f"{endpoint.identity}:{RELAY_TARGET_PORT}"
        options.append(("grpc.http_proxy", f"http://{endpoint.relay}"))
    else:
        target = endpoint.address
        options.append(("grpc.enable_http_proxy", 0))
    return target, credentials, options


def secure_channel(endpoint: Endpoint, options: list[tuple] = ()) -> grpc.Channel:
    target, credentials, options = _target_and_options(endpoint, list(options))
    return grpc.secure_channel(target, credentials, options=options)


def aio_secure_channel(endpoint: Endpoint, options: list[tuple] = ()) -> grpc.aio.Channel:
    target, credentials, options = _target_and_options(endpoint, list(options))
    return grpc.aio.secure_channel(target, credentials, options=options)


def server_credentials(certificate: bytes, private_key_pem: bytes) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(private_key_pem, certificate)])

"""Can the swarm dial me? A starting peer asks peers that can be dialled (and the bootstrap node) which address
its requests come from and to dial it back there, as libp2p's AutoNAT does, on the data plane.

Such helpers announce themselves under RENDEZVOUS_KEY (subkey: their signed identity; value: a RendezvousRecord),
and also run a relay for peers that turn out unreachable.
"""

import asyncio
import logging
import random
from dataclasses import dataclass

import grpc

from swarm.identity import identity_from_subkey, owner_public_key
from swarm.net.addresses import grpc_peer_host, join_host_port
from swarm.net.endpoints import Endpoint, aio_secure_channel
from swarm.net.tls import certificate_matches
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RENDEZVOUS_KEY = "_swarm.rendezvous"
DIAL_BACK_TIMEOUT = 3.0
MAX_CONCURRENT_DIAL_BACKS = 8
ASKED_HELPERS = 3


@dataclass(frozen=True)
class RendezvousRecord:
    """A reachable node that answers DialBack at `address` and relays at `relay_address`."""

    identity: str
    address: str
    certificate: bytes
    relay_address: str

    def to_dict(self) -> dict:
        return {"address": self.address, "certificate": self.certificate, "relay_address": self.relay_address}

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.identity, self.certificate, address=self.address)


def fetch_rendezvous(dht) -> list[RendezvousRecord]:
    """Announced helpers whose record is signed by the key of the certificate it carries."""
    entry = dht.get(RENDEZVOUS_KEY, latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return []
    found = []
    for subkey, item in entry.value.items():
        identity, value = identity_from_subkey(subkey), item.value
        try:
            record = RendezvousRecord(identity, str(value["address"]), bytes(value["certificate"]), str(value["relay_address"]))
        except (KeyError, TypeError, ValueError):
            continue
        if identity is not None and certificate_matches(record.certificate, owner_public_key(subkey)):
            found.append(record)
    return found


class RendezvousServicer(pb_grpc.RendezvousServicer):
    """Dials a caller back at the address its request came from (never at one it names)."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)

    async def DialBack(self, request: pb.DialBackRequest, context) -> pb.DialBackResponse:
        host = grpc_peer_host(context.peer())
        if host is None:
            return pb.DialBackResponse(error=f"cannot tell where {context.peer()!r} comes from")
        if not 0 < request.port < 65536 or not request.certificate or not request.identity:
            return pb.DialBackResponse(observed_host=host, error="port, certificate and identity are required")
        async with self._slots:
            endpoint = Endpoint(request.identity, bytes(request.certificate), address=join_host_port(host, request.port))
            error = await handshake(endpoint)
            dht_reachable = 0 < request.dht_port < 65536 and await _tcp_reachable(host, request.dht_port)
        return pb.DialBackResponse(observed_host=host, reachable=error is None, dht_reachable=dht_reachable, error=error or "")


async def handshake(endpoint: Endpoint, timeout: float = DIAL_BACK_TIMEOUT) -> str | None:
    """None if a TLS connection to `endpoint` comes up with its certificate, else why not."""
    try:
        channel = aio_secure_channel(endpoint)
    except ValueError as error:
        return str(error)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        return None
    except (TimeoutError, asyncio.TimeoutError):
        return f"no TLS connection to {endpoint.address} within {timeout:.0f}s"
    finally:
        await channel.close()


async def _tcp_reachable(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_BACK_TIMEOUT)
    except (OSError, TimeoutError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


@dataclass(frozen=True)
class Reachability:
    observed_host: str | None  # our address as the swarm sees it (None: nobody answered)
    reachable: bool
    dht_reachable: bool
    relays: list[RendezvousRecord]  # helpers that relay, for an unreachable peer


async def probe(helpers: list[RendezvousRecord], own_identity: str, port: int, certificate: bytes, dht_port: int = 0) -> Reachability:
    """Asks up to ASKED_HELPERS helpers (other than us) to dial us back; reachable if any of them could."""
    others = [helper for helper in helpers if helper.identity != own_identity]
    random.shuffle(others)
    request = pb.DialBackRequest(port=port, certificate=certificate, identity=own_identity, dht_port=dht_port)
    answers = await asyncio.gather(*(_ask(helper, request) for helper in others[:ASKED_HELPERS]))
    answers = [answer for answer in answers if answer is not None]
    observed = next((answer.observed_host for answer in answers if answer.observed_host), None)
    reachable = [answer for answer in answers if answer.reachable]
    for answer in answers:
        if not answer.reachable:
            logger.info(f"dial-back failed: {answer.error}")
    return Reachability(
        observed_host=reachable[0].observed_host if reachable else observed,
        reachable=bool(reachable),
        dht_reachable=any(answer.dht_reachable for answer in answers),
        relays=[helper for helper in others if helper.relay_address],
    )


async def _ask(helper: RendezvousRecord, request: pb.DialBackRequest) -> pb.DialBackResponse | None:
    async with aio_secure_channel(helper.endpoint) as channel:
        try:
            return await pb_grpc.RendezvousStub(channel).DialBack(request, timeout=2 * DIAL_BACK_TIMEOUT + 2)
        except grpc.aio.AioRpcError as error:
            logger.info(f"rendezvous {helper.address} did not answer: {error.code().name}")
            return None


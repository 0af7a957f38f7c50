"""How a peer is reached: what it listens on, what it announces, and whether it serves through a relay.

The decision, in order: an operator's --announce-host is taken as said; a swarm whose initial peers are all on
loopback lives on this machine and gets loopback addresses; otherwise the peer asks the swarm's helpers to dial it
back (see swarm.net.reachability) and announces the address they saw it come from, or, if none could dial it,
registers with a relay and announces that. Reachable peers help others the same way: they answer dial-backs and
relay (unless --no-relay).
"""

import asyncio
import logging
import random
from dataclasses import dataclass, field

import grpc
import hivemind
from hivemind.utils.crypto import RSAPrivateKey

from swarm.dht_node import swarm_dht
from swarm.net.addresses import (
    AddressError,
    first_public_host,
    free_port,
    is_loopback,
    is_public_maddr,
    is_unspecified,
    join_host_port,
    split_host_port,
    swarm_is_local,
    tcp_maddr,
)
from swarm.net.endpoints import server_credentials
from swarm.net.reachability import Reachability, RendezvousRecord, RendezvousServicer, fetch_rendezvous, probe
from swarm.net.relay import RelayListener, RelayServer
from swarm.net.tls import TLSIdentity
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RELAY_REGISTER_TIMEOUT = 15.0


@dataclass
class NetworkOptions:
    initial_peers: list[str]
    host: str | None = None  # data plane and DHT listen here (default: all interfaces, loopback for a local swarm)
    port: int = 0
    dht_port: int = 0
    announce_host: str | None = None
    announce_port: int | None = None
    relay: bool = True  # relay for (and dial back) others when reachable
    relay_port: int = 0


@dataclass
class NetworkPlan:
    """What the peer announces and how it listens; made by `plan_network`."""

    dht: hivemind.DHT
    listen_host: str
    port: int
    address: str  # host:port others dial, "" when only the relay reaches us
    relay: str = ""  # host:port of our relay when we are behind NAT
    reachability: str = "direct"  # "direct", "relayed" or "local"
    relay_listener: RelayListener | None = None
    helps_others: bool = False  # answer dial-backs and relay (we are reachable)
    notes: list[str] = field(default_factory=list)

    def move_to_port(self, port: int) -> None:
        """Listen on `port` instead (the one picked was taken before the server bound it); the announced address
        follows when it named the old port."""
        old, self.port = self.port, port
        if self.address:
            host, announced = split_host_port(self.address)
            if announced == old:
                self.address = join_host_port(host, port)
        if self.relay_listener is not None:
            self.relay_listener.local_port = port


async def plan_network(options: NetworkOptions, key: RSAPrivateKey, tls: TLSIdentity) -> NetworkPlan:
    loop = asyncio.get_running_loop()
    local = swarm_is_local(options.initial_peers)
    if options.announce_host and (is_unspecified(options.announce_host) or (is_loopback(options.announce_host) and not local)):
        raise AddressError(f"--announce-host {options.announce_host} is an address nobody else can dial; give the "
                           "one other machines reach this one at (or leave it out to have it found)")
    listen_host = options.host or ("127.0.0.1" if local else "0.0.0.0")
    port = options.port or free_port(listen_host)
    dht_port = options.dht_port or free_port(listen_host)
    announce_port = options.announce_port or port

    def start_dht(client_mode: bool = False, announce_host: str | None = None, port: int = dht_port) -> hivemind.DHT:
        return swarm_dht(
            key, initial_peers=options.initial_peers, start=True, client_mode=client_mode,
            host_maddrs=[tcp_maddr(listen_host, port)],
            announce_maddrs=[tcp_maddr(announce_host, dht_port)] if announce_host else None,
        )[0]

    if options.announce_host or local or not options.initial_peers:
        announce_host = options.announce_host or ("127.0.0.1" if is_unspecified(listen_host) else listen_host)
        dht = await loop.run_in_executor(None, start_dht, False, options.announce_host)
        notes = []
        if not options.initial_peers:  # a new swarm: nobody to ask how we are seen, and others need our address
            visible = dht.get_visible_maddrs()
            if not options.announce_host:
                announce_host = first_public_host(visible) or announce_host
                notes.append(f"new swarm: announcing {announce_host} (set --announce-host if others see us elsewhere)")
            joinable = [str(maddr) for maddr in visible if is_public_maddr(str(maddr))] or [str(maddr) for maddr in visible]
            notes.append(f"--initial-peers {joinable[0]}")
        address = join_host_port(announce_host, announce_port)
        return NetworkPlan(dht, listen_host, port, address, reachability="local" if local else "direct",
                           helps_others=options.relay, notes=notes)

    probe_dht = await loop.run_in_executor(None, start_dht, True, None, 0)  # dht_port stays free for the dial-back
    helpers = await loop.run_in_executor(None, fetch_rendezvous, probe_dht)
    found = await _probe_with_listeners(helpers, tls, listen_host, port, dht_port)
    if found.reachable:
        probe_dht.shutdown()
        dht = await loop.run_in_executor(None, start_dht, not found.dht_reachable, found.observed_host)
        notes = [] if found.dht_reachable else ["the DHT port is not reachable: the DHT node runs in client mode"]
        return NetworkPlan(dht, listen_host, port, join_host_port(found.observed_host, announce_port),
                           helps_others=options.relay, notes=notes)
    if not found.relays:
        probe_dht.shutdown()
        if not helpers:
            raise ConnectionError("no node of the swarm offers dial-backs and relaying, so this peer cannot learn "
                                  "whether it can be reached: give --announce-host (and --announce-port)")
        raise ConnectionError("this peer cannot be dialled from the swarm, and no reachable peer offers a relay")
    relay = random.choice(found.relays)

    async def another_relay(failed: str) -> str | None:
        helpers = await asyncio.get_running_loop().run_in_executor(None, fetch_rendezvous, probe_dht)
        others = [helper.relay_address for helper in helpers if helper.relay_address not in ("", failed)]
        return random.choice(others) if others else None

    listener = RelayListener(relay.relay_address, key, port, choose_relay=another_relay)
    return NetworkPlan(probe_dht, listen_host, port, "", relay=relay.relay_address, reachability="relayed",
                       relay_listener=listener,
                       notes=[f"not reachable from the swarm (seen as {found.observed_host}): serving through relay "
                              f"{relay.relay_address}"])


async def _probe_with_listeners(helpers: list[RendezvousRecord], tls: TLSIdentity, host: str, port: int, dht_port: int) -> Reachability:
    """Dial-back test with stand-ins on our ports: a TLS gRPC server with our certificate and a bare TCP listener
    for the DHT port (the real ones start once we know what to announce)."""
    server = grpc.aio.server()
    server.add_secure_port(join_host_port(host, port), server_credentials(tls.certificate, tls.private_key_pem))
    await server.start()
    dht_listener = await asyncio.start_server(lambda _reader, writer: writer.close(), host, dht_port)
    try:
        return await probe(helpers, tls.identity, port, tls.certificate, dht_port)
    finally:
        dht_listener.close()
        await dht_listener.wait_closed()
        await server.stop(None)


class HelperServices:
    """What a reachable node offers the swarm besides its blocks: dial-backs (on its gRPC server) and a relay."""

    def __init__(self) -> None:
        self.relay = RelayServer()
        self.relay_address = ""

    @staticmethod
    def add_to(server: grpc.aio.Server) -> None:
        pb_grpc.add_RendezvousServicer_to_server(RendezvousServicer(), server)

    async def start(self, listen_host: str, relay_port: int, announce_host: str) -> None:
        port = await self.relay.start(listen_host, relay_port)
        self.relay_address = join_host_port(announce_host, port)

    def record(self, identity: str, address: str, certificate: bytes) -> RendezvousRecord:
        return RendezvousRecord(identity, address, certificate, self.relay_address)

    async def stop(self) -> None:
        await self.relay.stop()


async def wait_registered(listener: RelayListener) -> None:
    """Waits for the relay to accept us, so that we announce only a route that works."""
    try:
        await asyncio.wait_for(listener.registered.wait(), RELAY_REGISTER_TIMEOUT)
    except TimeoutError:
        raise ConnectionError(f"the relay {listener.relay} did not register us within {RELAY_REGISTER_TIMEOUT:.0f}s") from None

"""`swarm-peer bootstrap`: the DHT node others join, which also dials back starting peers and relays for peers
behind NAT (so that the first peers of a swarm can learn whether they are reachable before any other can tell)."""

import asyncio
import signal

import grpc
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.network import HelperServices
from swarm.dht_node import swarm_dht
from swarm.identity import identity_of, load_or_create_key, own_subkey
from swarm.net.addresses import first_public_host, free_port, is_public_maddr, is_unspecified, join_host_port, tcp_maddr
from swarm.net.endpoints import server_credentials
from swarm.net.reachability import RENDEZVOUS_KEY
from swarm.net.tls import TLSIdentity

ANNOUNCE_PERIOD = 30.0


async def run_bootstrap(host: str, port: int, announce_host: str | None, rpc_port: int, relay_port: int,
                        identity_path: str | None) -> None:
    loop = asyncio.get_running_loop()
    key = load_or_create_key(identity_path) if identity_path else RSAPrivateKey()
    validator = RSASignatureValidator(key)
    identity = identity_of(validator.local_public_key)
    tls = TLSIdentity(key, identity)
    announce_maddrs = [tcp_maddr(announce_host, port)] if announce_host else None
    dht = await loop.run_in_executor(
        None, lambda: swarm_dht(key, start=True, host_maddrs=[tcp_maddr(host, port)], announce_maddrs=announce_maddrs)[0]
    )
    visible = [str(address) for address in dht.get_visible_maddrs()]
    public = [address for address in visible if is_public_maddr(address)]
    if announce_host is None:
        announce_host = host if not is_unspecified(host) else first_public_host(public) or "127.0.0.1"
    server = grpc.aio.server()
    HelperServices.add_to(server)
    rpc_port = rpc_port or free_port(host)
    server.add_secure_port(join_host_port(host, rpc_port), server_credentials(tls.certificate, tls.private_key_pem))
    await server.start()
    helpers = HelperServices()
    await helpers.start(host, relay_port, announce_host)
    record = helpers.record(identity, join_host_port(announce_host, rpc_port), tls.certificate).to_dict()
    subkey = own_subkey(validator)

    def announce() -> None:
        dht.store(RENDEZVOUS_KEY, subkey=subkey, value=record, expiration_time=get_dht_time() + 2 * ANNOUNCE_PERIOD)

    await loop.run_in_executor(None, announce)
    # Addresses other machines can dial first: the first line is what a user copies.
    for address in public + [address for address in visible if address not in public]:
        print(f"--initial-peers {address}", flush=True)
    print(f"dial-back at {join_host_port(announce_host, rpc_port)}, relay at {helpers.relay_address}", flush=True)
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), ANNOUNCE_PERIOD)
        except TimeoutError:
            await loop.run_in_executor(None, announce)
    await server.stop(grace=1)
    await helpers.stop()
    dht.shutdown()

"""Discovery right after start-up: a peer's online announcement is what the next fresh client reads, first time.

Each cycle starts new DHT nodes that announce themselves as a peer does (the peer's own Announcer, signed records
with certificates) the moment they have joined, and then a new client-mode node reads the swarm once: every
announced peer must be there on that first read. The same cycle with real peer processes is bench/discovery.py
(slower: a peer process takes seconds of CPU to start).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.announcer import Announcer
from swarm.constants import PROTOCOL_VERSION
from swarm.dht_node import swarm_dht
from swarm.dht_records import ServerRecord, ServerState, fetch_peer_spans
from swarm.identity import identity_of, own_subkey
from swarm.net.tls import TLSIdentity

CYCLES = 50
SPANS = [(0, 2), (2, 4), (0, 4)]
NUM_BLOCKS = 4


def announce_as_a_peer(bootstrap: str, prefix: str, start: int, end: int):
    """A fresh DHT node that announces itself online for blocks [start, end), as `Peer.run` does; (node, identity)."""
    key = RSAPrivateKey()
    dht, validator = swarm_dht(key, initial_peers=[bootstrap], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    identity = identity_of(validator.local_public_key)
    record = ServerRecord(
        state=ServerState.ONLINE, start_block=start, end_block=end, address="127.0.0.1:9", dtype="float32",
        version=PROTOCOL_VERSION, throughput=100.0, started_at=get_dht_time(),
        certificate=TLSIdentity(key, identity).certificate,
    )
    info = {"name": prefix, "model_type": "llama", "num_blocks": NUM_BLOCKS}
    announcer = Announcer(dht, own_subkey(RSASignatureValidator(key)), prefix, info, lambda: record, period=30.0)
    asyncio.run(announcer.announce())
    return dht, identity


@pytest.mark.slow
def test_fresh_clients_see_freshly_started_peers_on_their_first_read(bootstrap):
    misses = []
    with ThreadPoolExecutor(len(SPANS)) as pool:  # peers start together, as in a real swarm's start-up
        for cycle in range(CYCLES):
            prefix = f"discovery-{cycle}"  # a model of its own each cycle: nothing left over from the last one
            nodes = list(pool.map(lambda span: announce_as_a_peer(bootstrap, prefix, *span), SPANS))
            client = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)[0]
            try:
                seen = {span.peer_id for span in fetch_peer_spans(client, prefix, NUM_BLOCKS)}
                missing = {identity for _, identity in nodes} - seen
                if missing:
                    misses.append((cycle, len(missing)))
            finally:
                list(pool.map(lambda dht: dht.shutdown(), [client] + [dht for dht, _ in nodes]))
    assert misses == [], f"{len(misses)} of {CYCLES} cycles missed peers (cycle, how many): {misses}"

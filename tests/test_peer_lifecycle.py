"""A peer announces joining -> online -> offline, and shuts down cleanly on SIGTERM and SIGINT."""

import signal

import hivemind
import pytest

from swarm.checkpoint import Checkpoint
from swarm.dht_records import ServerState, fetch_peer_spans
from peer.local_swarm import spawn_cli, start_peers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_online_then_offline_on_signal(tiny_llama, bootstrap, sig):
    prefix = Checkpoint(tiny_llama).model_prefix()
    dht = hivemind.DHT(initial_peers=[bootstrap], client_mode=True, start=True)
    try:
        (peer,) = start_peers(tiny_llama, bootstrap, ["1:3"])
        spans = {s.peer_id: s for s in fetch_peer_spans(dht, prefix, 4)}
        assert spans[peer.peer_id].record.state == ServerState.ONLINE
        assert (spans[peer.peer_id].start, spans[peer.peer_id].end) == (1, 3)
        assert peer.process.stop(sig) == 0
        assert "stopped" in "".join(peer.process.output)
        every_state = (ServerState.OFFLINE, ServerState.JOINING, ServerState.ONLINE)
        spans = {s.peer_id: s for s in fetch_peer_spans(dht, prefix, 4, states=every_state)}
        assert spans[peer.peer_id].record.state == ServerState.OFFLINE
    finally:
        dht.shutdown()


def test_num_blocks_picks_the_uncovered_blocks(tiny_llama, bootstrap):
    (first,) = start_peers(tiny_llama, bootstrap, ["0:2"])
    try:
        second = spawn_cli("serve", tiny_llama, "--initial-peers", bootstrap, "--num-blocks", "2")
        match = second.wait_for_line(r"online: blocks (\d+):(\d+)")
        assert (int(match.group(1)), int(match.group(2))) == (2, 4)
        second.stop()
    finally:
        first.process.stop()

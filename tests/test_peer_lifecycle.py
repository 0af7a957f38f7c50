"""A peer announces joining -> online -> offline, and shuts down cleanly on SIGTERM and SIGINT."""

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from hivemind.utils import get_dht_time

from peer.local_swarm import process_group_gone, spawn_cli, start_peers
from swarm.checkpoint import Checkpoint
from swarm.dht_node import swarm_dht
from swarm.dht_records import ServerState, block_key, fetch_peer_spans
from swarm.identity import identity_of, own_subkey
from swarm.net.tls import TLSIdentity


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_online_then_offline_on_signal(tiny_llama, bootstrap, sig):
    prefix = Checkpoint(tiny_llama).model_prefix()
    dht, _ = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)
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


def test_forged_records_for_another_peer_are_rejected(tiny_llama, bootstrap):
    """A node that is not the peer can neither overwrite its record nor add one under its identity."""
    prefix = Checkpoint(tiny_llama).model_prefix()
    (peer,) = start_peers(tiny_llama, bootstrap, ["0:4"])
    forger, forger_validator = swarm_dht(initial_peers=[bootstrap], start=True)
    try:
        (genuine,) = [span for span in fetch_peer_spans(forger, prefix, 4) if span.peer_id == peer.peer_id]
        victim_subkey = _subkey_of(forger, prefix, peer.peer_id)
        fake = dict(genuine.record.to_dict(), address="127.0.0.1:1", state=int(ServerState.OFFLINE), throughput=1e9)
        expiration = get_dht_time() + 60
        # 1. Overwrite the victim's own record: it is not signed by the victim's key, so no node stores it.
        assert not forger.store(block_key(prefix, 0), fake, expiration, subkey=victim_subkey)
        # 2. Claim the victim's identity under the forger's own key: stored, but readers see it is not the victim.
        claimed = peer.peer_id.encode() + forger_validator.local_public_key
        forger.store(block_key(prefix, 0), fake, expiration, subkey=claimed)
        # 3. An unsigned record under the victim's identity: ignored as well; a text subkey is not even stored.
        forger.store(block_key(prefix, 0), fake, expiration, subkey=peer.peer_id.encode())
        assert not forger.store(block_key(prefix, 0), fake, expiration, subkey=peer.peer_id)
        spans = [span for span in fetch_peer_spans(forger, prefix, 4, states=tuple(ServerState)) if span.peer_id == peer.peer_id]
        assert [span.record for span in spans] == [genuine.record]
        # The forger's honest record under its own identity (with its own certificate) is accepted.
        forger_identity = identity_of(forger_validator.local_public_key)
        honest = dict(fake, certificate=TLSIdentity(forger_validator._private_key, forger_identity).certificate)
        assert forger.store(block_key(prefix, 1), honest, expiration, subkey=own_subkey(forger_validator))
        seen = {span.peer_id for span in fetch_peer_spans(forger, prefix, 4, states=tuple(ServerState))}
        assert forger_identity in seen
    finally:
        forger.shutdown()
        peer.process.stop()


def _subkey_of(dht, prefix: str, identity: str) -> bytes:
    entry = dht.get(block_key(prefix, 0), latest=True)
    return next(subkey for subkey in entry.value if isinstance(subkey, bytes) and subkey.startswith(identity.encode()))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["parent-SIGKILL", "group-SIGTERM"])
def test_a_dht_process_never_outlives_its_parent(sig):
    """The DHT child ignores SIGTERM (its parent stops it in order); if the parent dies without doing so, killed alone
    or by a group SIGTERM before its handlers are in place, the child and its libp2p daemon leave by themselves."""
    program = "from swarm.dht_node import swarm_dht; import time; swarm_dht(start=True); print('ready', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        if sig == signal.SIGKILL:
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGTERM)  # python's default action: the parent dies at once
        process.wait(10)
        assert process_group_gone(process.pid, timeout=10), "the DHT process or its daemon outlived the parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

"""Volunteers choose where the swarm is weakest and rebalance when a peer leaves (real processes, real DHT)."""

import itertools
import time
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import spawn_cli, start_peers
from peer.resources import block_bytes, cache_bytes_per_token
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from swarm.coverage import block_servers, block_throughputs
from swarm.dht_node import swarm_dht
from swarm.dht_records import PeerSpan, ServerState, fetch_peer_spans

pytestmark = pytest.mark.slow

NUM_BLOCKS, CACHE_TOKENS = 8, 1024
SETTLE_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def eight_blocks(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny-eight"
    return str(save_random_checkpoint(path, tiny_llama_config(num_layers=NUM_BLOCKS), seed=3))


def volunteer(model: str, bootstrap: str, models_dir: str, memory: int, name: str):
    return spawn_cli(
        "join", model, "--models-dir", models_dir, "--initial-peers", bootstrap, "--max-memory", str(memory),
        "--cache-tokens", str(CACHE_TOKENS), "--device", "cpu", "--public-name", name, "--num-threads", "1",
        "--announce-period", "2", "--balance-period", "2", module="peer.volunteer",
    )


def best_minimum(spans: list[PeerSpan]) -> float:
    """The highest minimum per-block throughput any placement of these peers' spans could give."""
    placements = itertools.product(*(range(NUM_BLOCKS - (span.end - span.start) + 1) for span in spans))
    return max(
        min(block_throughputs([moved(span, start) for span, start in zip(spans, starts)], NUM_BLOCKS))
        for starts in placements
    )


def moved(span: PeerSpan, start: int) -> PeerSpan:
    return PeerSpan(span.peer_id, replace(span.record, start_block=start, end_block=start + span.end - span.start))


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def test_volunteers_cover_the_weakest_blocks_and_close_a_gap_when_one_leaves(eight_blocks, bootstrap):
    checkpoint = Checkpoint(eight_blocks)
    prefix = checkpoint.model_prefix()
    cache_bytes = CACHE_TOKENS * cache_bytes_per_token(checkpoint.config, torch.float32)
    per_block = block_bytes(checkpoint, torch.float32) + cache_bytes
    room_for_four = int(4.5 * per_block)
    models_dir = str(checkpoint.path.parent)
    dht, _ = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)
    volunteers = {}

    def swarm():
        return fetch_peer_spans(dht, prefix, NUM_BLOCKS, (ServerState.JOINING, ServerState.ONLINE))

    try:
        # The first one starts the model from its folder; the others find it by name in the swarm's index.
        for name, model in (("v1", eight_blocks), ("v2", "tiny-eight"), ("v3", "tiny-eight")):
            volunteers[name] = volunteer(model, bootstrap, models_dir, room_for_four, name)
            volunteers[name].wait_for_line(r"4 of 8 blocks on cpu in float32 \(room for 4 ")
            volunteers[name].wait_for_line(r"online: blocks \d+:\d+")
        spans = wait_for(lambda: (s := swarm()) and {x.record.state for x in s} == {ServerState.ONLINE} and len(s) == 3 and s,
                         SETTLE_TIMEOUT, "three online volunteers")
        by_name = {span.record.public_name: span for span in spans}
        assert (by_name["v1"].start, by_name["v2"].start) == (0, 4)  # nothing served: first blocks; then the rest
        assert by_name["v3"].start in (0, 4)  # then the weaker half (equal here: they share the measured throughput)
        assert min(block_servers(spans, NUM_BLOCKS)) == 1
        assert min(block_throughputs(spans, NUM_BLOCKS)) == pytest.approx(best_minimum(spans))

        # The volunteer that alone serves its half leaves; the one doubling the other half moves there.
        leaving = "v2" if by_name["v3"].start == 0 else "v1"
        volunteers.pop(leaving).stop()
        left_at = time.monotonic()
        gaps_seen = []

        def closed():
            spans = [span for span in swarm() if span.record.public_name != leaving]
            gaps = {block for block, count in enumerate(block_servers(spans, NUM_BLOCKS)) if count == 0}
            gaps_seen.append(gaps)
            return not gaps and all(span.record.moving_to is None for span in spans) and spans

        spans = wait_for(closed, SETTLE_TIMEOUT, "rebalancing after a volunteer left")
        print(f"gap closed {time.monotonic() - left_at:.1f}s after the volunteer left")
        assert sorted(span.start for span in spans) == [0, 4]
        assert min(block_throughputs(spans, NUM_BLOCKS)) == pytest.approx(best_minimum(spans))
        assert all(later <= earlier for earlier, later in zip(gaps_seen, gaps_seen[1:]))  # no new gap on the way
        # The mover prints once its old span's runtime has shut down, which may be after its new record is read.
        wait_for(lambda: any("moved: blocks" in line for process in volunteers.values() for line in process.output),
                 SETTLE_TIMEOUT, "the mover's 'moved' line")

        # The moved peer serves its new blocks correctly.
        reference = LlamaForCausalLM.from_pretrained(eight_blocks).eval()
        model = AutoDistributedModelForCausalLM.from_pretrained(eight_blocks, initial_peers=[bootstrap])
        try:
            inputs = torch.tensor([[1, 40, 41, 42, 43]])
            expected = reference.generate(inputs, max_new_tokens=12, do_sample=False)
            assert torch.equal(model.generate(inputs, max_new_tokens=12, do_sample=False), expected)
        finally:
            model.close()
    finally:
        for process in volunteers.values():
            process.stop()
        dht.shutdown()


def test_a_session_survives_its_peer_moving(eight_blocks, bootstrap, tmp_path):
    """A session routed through a peer that then moves to other blocks: its next steps are replayed elsewhere and
    the tokens are those of local transformers."""
    pinned = start_peers(eight_blocks, bootstrap, ["0:4", "4:8"], "--announce-period", "2")
    mover = spawn_cli(
        "serve", eight_blocks, "--initial-peers", bootstrap, "--num-blocks", "4", "--num-threads", "1",
        "--announce-period", "2", "--balance-period", "2", "--public-name", "mover",
    )
    model = None
    try:
        assert mover.wait_for_line(r"online: blocks (\d+):\d+").group(1) == "0"  # equal halves: the first
        reference = LlamaForCausalLM.from_pretrained(eight_blocks).eval()
        model = AutoDistributedModelForCausalLM.from_pretrained(eight_blocks, initial_peers=[bootstrap])
        view = model.remote.view
        for span in view.peer_spans(refresh=True):  # route blocks 0:4 through the mover
            view._rtts[span.peer_id] = (5.0 if span.peer_id == pinned[0].peer_id else 0.0, time.monotonic())
        inputs = torch.tensor([[1, 40, 41, 42, 43]])
        expected = reference.generate(inputs, max_new_tokens=16, do_sample=False)
        with model.inference_session(max_length=32) as session:
            first = model.generate(inputs, max_new_tokens=8, do_sample=False)
            assert session.route[0].peer.record.public_name == "mover"
            pinned[1].process.stop()  # blocks 4:8 lose their server; the mover takes them
            mover.wait_for_line(r"moved: blocks 4:8", timeout=SETTLE_TIMEOUT)
            output = model.generate(first, max_new_tokens=8, do_sample=False)
        assert torch.equal(output, expected)
    finally:
        if model is not None:
            model.close()
        mover.stop()
        for peer in pinned:
            peer.process.stop()

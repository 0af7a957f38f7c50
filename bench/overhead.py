"""Per-hop overhead of a decode step: round trip to a peer minus the compute the peer does for it.

The peer serves one block of a tiny model (hidden 64), so the round trip is almost all overhead; the block's own
compute for the same step (run in this process through the same batched-pass code) is subtracted.
"""

import statistics
import tempfile
import time

import torch

from bench.results import Result
from client import AutoDistributedModelForCausalLM
from peer.batching import run_pass
from peer.kv_pages import PAGE_SIZE, PagedKV
from peer.local_swarm import start_peers
from peer.sessions import InferenceSessionState, StepWork
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config


def hop_overhead(bootstrap: str, steps: int) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        save_random_checkpoint(folder, tiny_llama_config(num_layers=1))
        (peer,) = start_peers(folder, bootstrap, ["0:1"])
        try:
            round_trip = _round_trip(folder, bootstrap, peer.peer_id, steps)
        finally:
            peer.process.stop()
        compute = _block_compute(folder, steps)
    return Result(
        "per-hop overhead of a decode step", "ms", (round_trip - compute) * 1e3, higher_is_better=False,
        detail=f"loopback round trip {round_trip * 1e3:.2f} ms minus block compute {compute * 1e3:.2f} ms",
    )


def _round_trip(folder: str, bootstrap: str, peer_id: str, steps: int) -> float:
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[bootstrap], allowed_peers=(peer_id,))
    hidden = torch.randn(1, 1, model.config.hidden_size)
    timings = []
    try:
        with model.remote.inference_session(max_length=steps + 1) as session:
            for _ in range(steps):
                started = time.perf_counter()
                session.step(hidden)
                timings.append(time.perf_counter() - started)
    finally:
        model.close()
    return statistics.median(timings[len(timings) // 10 :])


def _block_compute(folder: str, steps: int) -> float:
    span = BlockSpan.from_checkpoint(Checkpoint(folder), 0, 1, torch.float32)
    kv = PagedKV(1, num_pages=-(-(steps + 1) // PAGE_SIZE), page_size=PAGE_SIZE)
    session = InferenceSessionState("bench", 0, 0, 1, 1, steps + 1, list(range(kv.num_pages)))
    hidden, mask = torch.randn(1, 1, span.config.hidden_size), torch.ones(1, 1, dtype=torch.bool)
    timings = []
    for _ in range(steps):
        work = StepWork(session, hidden, torch.tensor([[session.position]]), mask)
        started = time.perf_counter()
        run_pass(span, kv, [work], 1)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings[len(timings) // 10 :])

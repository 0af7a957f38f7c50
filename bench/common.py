"""Helpers shared by the benchmarks: a local swarm of real processes and median timing."""

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.processes import start_bootstrap, start_peers  # noqa: E402


@contextlib.contextmanager
def local_swarm(model_path: str, spans: list[str], *peer_args: str) -> Iterator[str]:
    """Bootstrap + one peer per span on loopback; yields the bootstrap multiaddr."""
    node, address = start_bootstrap()
    peers = []
    try:
        peers = start_peers(model_path, address, spans, *peer_args)
        yield address
    finally:
        for peer in peers:
            peer.process.stop()
        node.stop()


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)

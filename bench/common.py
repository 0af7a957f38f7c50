"""Helpers shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable


def timed(function: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns (after one warm-up each) so that noise hits them alike."""
    for function in functions.values():
        function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            timings[name].append(timed(function))
    return {name: statistics.median(values) for name, values in timings.items()}

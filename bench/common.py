"""Helpers shared by the benchmarks."""

import argparse
import statistics
import time
from collections.abc import Callable

from transformers import LlamaConfig

from swarm.checkpoint_maker import tiny_llama_config


def timed(function: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved_timings(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function in each of `repeats` rounds, run in turns (after one warm-up each) so that noise
    hits them alike: the i-th timings of two functions ran in the same round."""
    for function in functions.values():
        function()
    timings: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            timings[name].append(timed(function))
    return timings


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over `interleaved_timings`' rounds."""
    return {name: statistics.median(values) for name, values in interleaved_timings(functions, repeats).items()}


def rates(amount: float, seconds: list[float]) -> list[float]:
    return [amount / value for value in seconds]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark model: a random Llama, ~118M parameters by default (hidden 1024, 8 layers, vocab 8192)."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return tiny_llama_config(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64,
        intermediate_size=int(args.hidden * 2.6875), vocab_size=args.vocab,
    )


def even_spans(layers: int, peers: int = 2) -> list[str]:
    """Spans of `peers` peers sharing the blocks as equally as they can."""
    bounds = [layers * index // peers for index in range(peers + 1)]
    return [f"{start}:{end}" for start, end in zip(bounds, bounds[1:])]

"""A quick measure of how many tokens/s this peer pushes through its span (announced for routing)."""

import time

import torch

from swarm.blocks import BlockSpan


def measure_throughput(span: BlockSpan, dtype: torch.dtype, tokens: int = 64, repeats: int = 3) -> float:
    device = next(span.parameters()).device
    hidden = torch.randn(1, tokens, span.config.hidden_size, dtype=dtype, device=device)
    position_ids = torch.arange(tokens, device=device)[None]
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    timings = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            span(hidden, position_ids, mask)
            timings.append(time.perf_counter() - started)
    return tokens / sorted(timings)[len(timings) // 2]

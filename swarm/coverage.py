"""How well the swarm covers a model's blocks: the throughput each block gets from the peers serving it."""

from collections.abc import Callable

from swarm.dht_records import PeerSpan


def block_throughputs(spans: list[PeerSpan], num_blocks: int) -> list[float]:
    """Tokens/s each block can serve: the sum over the peers whose span holds it (each at its span's rate)."""
    return _sum_per_block(spans, num_blocks, lambda span: span.record.effective_throughput, 0.0)


def block_servers(spans: list[PeerSpan], num_blocks: int) -> list[int]:
    """How many peers serve each block; 0 is a gap."""
    return _sum_per_block(spans, num_blocks, lambda span: 1, 0)


def _sum_per_block(spans: list[PeerSpan], num_blocks: int, value: Callable[[PeerSpan], float], zero: float) -> list:
    totals = [zero] * num_blocks
    for span in spans:
        for block in range(span.start, min(span.end, num_blocks)):
            totals[block] += value(span)
    return totals

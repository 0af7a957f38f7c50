"""How well the swarm covers a model's blocks: the throughput each block gets from the peers serving it."""

from swarm.dht_records import PeerSpan


def block_throughputs(spans: list[PeerSpan], num_blocks: int) -> list[float]:
    """Tokens/s each block can serve: the sum over the peers whose span holds it (each at its span's rate)."""
    throughputs = [0.0] * num_blocks
    for span in spans:
        for block in range(span.start, min(span.end, num_blocks)):
            throughputs[block] += span.record.effective_throughput
    return throughputs


def block_servers(spans: list[PeerSpan], num_blocks: int) -> list[int]:
    """How many peers serve each block; 0 is a gap."""
    counts = [0] * num_blocks
    for span in spans:
        for block in range(span.start, min(span.end, num_blocks)):
            counts[block] += 1
    return counts

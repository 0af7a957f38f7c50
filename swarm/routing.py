"""Choosing chains of peers that cover a range of blocks."""

from dataclasses import dataclass

from swarm.dht_records import PeerSpan
from swarm.errors import MissingBlocksError


@dataclass(frozen=True)
class Hop:
    """One step of a chain: run blocks [start, end) on `peer`."""

    peer: PeerSpan
    start: int
    end: int


def missing_blocks(spans: list[PeerSpan], start: int, end: int) -> list[int]:
    covered = set()
    for span in spans:
        covered.update(range(max(span.start, start), min(span.end, end)))
    return [block for block in range(start, end) if block not in covered]


def fewest_hops_chain(spans: list[PeerSpan], start: int, end: int, model_prefix: str = "") -> list[Hop]:
    """The chain with the fewest hops covering [start, end): from each position, the peer that reaches furthest.

    Greedy furthest-reach is optimal for interval cover. Ties go to the peer with more cache left, then to its id
    (so the choice is deterministic).
    """
    gaps = missing_blocks(spans, start, end)
    if gaps:
        raise MissingBlocksError(model_prefix, gaps)
    chain: list[Hop] = []
    position = start
    while position < end:
        candidates = [span for span in spans if span.start <= position < span.end]
        best = max(candidates, key=lambda span: (span.end, span.record.cache_tokens_left, span.peer_id))
        hop_end = min(best.end, end)
        chain.append(Hop(best, position, hop_end))
        position = hop_end
    return chain

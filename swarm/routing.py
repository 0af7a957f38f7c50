"""Choosing chains of peers that cover a range of blocks."""

import bisect
import heapq
import math
import random
from collections.abc import Callable
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


def with_cache_room(spans: list[PeerSpan], start: int, end: int, cache_tokens: int) -> list[PeerSpan]:
    """The peers with `cache_tokens` of cache free, if they cover [start, end); otherwise all of them (a full peer
    lets a new session wait for room, which beats having no chain)."""
    roomy = [span for span in spans if span.record.cache_tokens_left >= cache_tokens]
    return spans if missing_blocks(roomy, start, end) else roomy


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


def lowest_cost_chain(
    spans: list[PeerSpan], start: int, end: int, hop_cost: Callable[[PeerSpan, int, int], float], model_prefix: str = ""
) -> list[Hop]:
    """The chain over [start, end) with the lowest total `hop_cost(peer, hop_start, hop_end)`: Dijkstra over the
    boundaries where some span starts or ends (a hop may stop at any of them inside its peer's span, to switch to
    a better peer). A fixed cost per hop in `hop_cost` favours fewer hops."""
    gaps = missing_blocks(spans, start, end)
    if gaps:
        raise MissingBlocksError(model_prefix, gaps)
    boundaries = sorted({end} | {b for span in spans for b in (span.start, span.end) if start < b < end})
    best: dict[int, tuple[float, list[Hop]]] = {start: (0.0, [])}
    frontier = [(0.0, start)]
    while frontier:
        cost, position = heapq.heappop(frontier)
        if position == end:
            return best[end][1]
        if cost > best[position][0]:
            continue
        for span in spans:
            if not span.start <= position < span.end:
                continue
            reach = min(span.end, end)
            for hop_end in boundaries[bisect.bisect_right(boundaries, position) : bisect.bisect_right(boundaries, reach)]:
                new_cost = cost + hop_cost(span, position, hop_end)
                if new_cost < best.get(hop_end, (math.inf, []))[0]:
                    best[hop_end] = (new_cost, best[position][1] + [Hop(span, position, hop_end)])
                    heapq.heappush(frontier, (new_cost, hop_end))
    raise MissingBlocksError(model_prefix, [end - 1])  # unreachable when there are no gaps


def chain_leaving_another(
    spans: list[PeerSpan], start: int, end: int, hop_cost: Callable[[PeerSpan, int, int], float], model_prefix: str = ""
) -> list[Hop]:
    """The lowest-cost chain over [start, end) among those whose peers, all left out, leave the blocks still covered
    by the other peers: a second opinion chosen so that a third one can still break a tie. Tries the lowest-cost
    chain, then that chain again with each of its peers left out in turn (so a chain mixing two disjoint chains is
    replaced by one of them); when none of these leaves another chain, the lowest-cost chain."""
    first = lowest_cost_chain(spans, start, end, hop_cost, model_prefix)
    candidates = [first]
    for left_out in dict.fromkeys(hop.peer.peer_id for hop in first):
        others = [span for span in spans if span.peer_id != left_out]
        if not missing_blocks(others, start, end):
            candidates.append(lowest_cost_chain(others, start, end, hop_cost, model_prefix))

    def leaves_another(chain: list[Hop]) -> bool:
        used = {hop.peer.peer_id for hop in chain}
        return not missing_blocks([span for span in spans if span.peer_id not in used], start, end)

    def cost(chain: list[Hop]) -> float:
        return sum(hop_cost(hop.peer, hop.start, hop.end) for hop in chain)

    return min((chain for chain in candidates if leaves_another(chain)), key=cost, default=first)


def spread_chain(spans: list[PeerSpan], start: int, end: int, rng: random.Random, model_prefix: str = "") -> list[Hop]:
    """A chain for forward/backward that spreads load: at each position, a peer covering it is drawn with
    probability proportional to its throughput, and used as far as it reaches."""
    gaps = missing_blocks(spans, start, end)
    if gaps:
        raise MissingBlocksError(model_prefix, gaps)
    chain, position = [], start
    while position < end:
        candidates = [span for span in spans if span.start <= position < span.end]
        weights = [max(span.record.throughput, 1e-3) for span in candidates]
        chosen = rng.choices(candidates, weights)[0]
        chain.append(Hop(chosen, position, min(chosen.end, end)))
        position = chain[-1].end
    return chain

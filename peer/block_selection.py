"""Which blocks a peer serves: the swarm's weakest first, and when moving elsewhere would clearly help.

The swarm is as fast as its slowest block, so a peer that chooses (when it joins, or when it rebalances) takes the
window of blocks that raises the minimum per-block throughput most. A peer moves only when that raises the
minimum by a clear margin (or closes gaps) and every block it leaves stays served by someone else: moves never
open a gap, and a move can never be undone by the same rule (that would need the margin both ways), so peers
do not flap.
"""

from dataclasses import replace

from swarm.coverage import block_servers, block_throughputs
from swarm.dht_records import PeerSpan

DEFAULT_MARGIN = 0.2  # a move must raise the minimum per-block throughput by 20%


def choose_start(throughputs: list[float], length: int) -> int:
    """The start of the `length`-block window whose throughputs, sorted, are smallest: it covers the weakest block,
    then the next weakest, and so on (ties: the earliest window)."""
    if not 0 < length <= len(throughputs):
        raise ValueError(f"cannot serve {length} blocks of a {len(throughputs)}-block model")
    return min(range(len(throughputs) - length + 1), key=lambda start: (sorted(throughputs[start : start + length]), start))


def planned_spans(spans: list[PeerSpan]) -> list[PeerSpan]:
    """Peers that announced a move counted where they are going, so that two peers do not fill the same gap."""
    planned = []
    for span in spans:
        record = span.record
        if record.moving_to is not None:
            length = record.end_block - record.start_block
            record = replace(record, start_block=record.moving_to, end_block=record.moving_to + length)
        planned.append(PeerSpan(span.peer_id, record))
    return planned


def better_start(spans: list[PeerSpan], own: PeerSpan, num_blocks: int, margin: float = DEFAULT_MARGIN) -> int | None:
    """Where `own` should move to, or None to stay. `spans` is the swarm as announced (with or without `own`)."""
    others = [span for span in planned_spans(spans) if span.peer_id != own.peer_id]
    length = own.end - own.start
    new_start = choose_start(block_throughputs(others, num_blocks), length)
    if new_start == own.start:
        return None
    moved = PeerSpan(own.peer_id, replace(own.record, start_block=new_start, end_block=new_start + length, moving_to=None))
    before_servers, after_servers = block_servers(others + [own], num_blocks), block_servers(others + [moved], num_blocks)
    if any(before and not after for before, after in zip(before_servers, after_servers)):
        return None  # it would leave some block without a server
    gaps_before, gaps_after = before_servers.count(0), after_servers.count(0)
    if gaps_after != gaps_before:
        return new_start if gaps_after < gaps_before else None
    before = _min_served(block_throughputs(others + [own], num_blocks))
    after = _min_served(block_throughputs(others + [moved], num_blocks))
    return new_start if after > before * (1 + margin) else None


def _min_served(throughputs: list[float]) -> float:
    served = [throughput for throughput in throughputs if throughput > 0]
    return min(served, default=0.0)

"""Block choice and load balancing decisions (pure functions; the multi-process behaviour is in test_balancing)."""

import itertools
import random

import pytest

from peer.block_selection import better_start, choose_start
from swarm.coverage import block_servers, block_throughputs
from swarm.dht_records import PeerSpan, ServerRecord, ServerState


def span(peer_id: str, start: int, end: int, throughput: float = 100.0, moving_to: int | None = None) -> PeerSpan:
    record = ServerRecord(ServerState.ONLINE, start, end, "x:1", "float32", "1", throughput=throughput, moving_to=moving_to)
    return PeerSpan(peer_id, record)


def test_choose_start_covers_the_weakest_blocks_first():
    assert choose_start([0.0] * 8, 4) == 0
    assert choose_start([100.0] * 4 + [0.0] * 4, 4) == 4
    assert choose_start([100.0] * 4 + [50.0] * 4, 4) == 4
    assert choose_start([100.0, 100.0, 100.0, 0.0, 100.0, 100.0], 2) == 2  # a gap in the middle: earliest window
    with pytest.raises(ValueError, match="cannot serve 9 blocks"):
        choose_start([0.0] * 8, 9)


def test_network_bound_peers_count_at_network_speed():
    record = ServerRecord(ServerState.ONLINE, 0, 2, "x:1", "float32", "1", throughput=100.0, network_throughput=30.0)
    assert block_throughputs([PeerSpan("a", record)], 3) == [30.0, 30.0, 0.0]


def test_moves_close_a_gap_without_opening_one():
    # b left: a and c both serve 0:4, blocks 4:8 have no server; either may move, and the one that does closes it
    spans = [span("a", 0, 4), span("c", 0, 4)]
    assert better_start(spans, spans[1], 8) == 4
    # the only server of blocks 0:4 stays, whatever the gap elsewhere
    assert better_start([span("a", 0, 4)], span("a", 0, 4), 8) is None


def test_a_peer_that_announced_a_move_is_counted_where_it_goes():
    spans = [span("a", 0, 4), span("c", 0, 4, moving_to=4)]
    assert better_start(spans, spans[0], 8) is None  # c is taking the gap; a moving too would open 0:4


def test_small_gains_do_not_move_a_peer():
    spans = [span("a", 0, 4, 100.0), span("b", 4, 8, 105.0), span("c", 0, 4, 50.0)]  # min 105 (b's blocks)
    assert better_start(spans, spans[2], 8) is None  # moving onto b: min becomes 100, not better
    spans = [span("a", 0, 4, 100.0), span("b", 4, 8, 300.0), span("c", 4, 8, 50.0)]  # a's blocks: only 100
    assert better_start(spans, spans[2], 8) == 0  # min 100 -> 150, above the 20% margin


def test_decisions_converge_to_the_best_layout_and_never_flap():
    """Random swarms: peers repeatedly apply better_start one at a time; it stops, with the best reachable minimum."""
    rng = random.Random(0)
    for _ in range(50):
        throughputs = [rng.uniform(50, 150) for _ in range(3)]
        spans = [span(name, 0, 4, throughput) for name, throughput in zip("abc", throughputs)]
        moves = 0
        for step in range(30):
            index = step % 3
            new_start = better_start(spans, spans[index], 8)
            if new_start is not None:
                spans[index] = span(spans[index].peer_id, new_start, new_start + 4, throughputs[index])
                moves += 1
        assert moves <= 3
        assert all(count > 0 for count in block_servers(spans, 8))
        best = max(
            min(block_throughputs([span(n, s, s + 4, t) for n, s, t in zip("abc", starts, throughputs)], 8))
            for starts in itertools.product(range(5), repeat=3)
        )
        assert min(block_throughputs(spans, 8)) * 1.2 >= best

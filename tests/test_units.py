"""Pure parts: routing math, tensor encoding, record parsing, the cache pool."""

import asyncio
import time

import pytest
import torch

from client.transport import StreamWatchdog
from peer.memory_pool import CacheExhaustedError, CachePool
from swarm import huge_pages, tensors
from swarm.dht_records import PeerSpan, ServerRecord, ServerState
from swarm.errors import MissingBlocksError
from swarm.routing import chain_leaving_another, fewest_hops_chain, lowest_cost_chain, spread_chain, with_cache_room


def span(peer_id: str, start: int, end: int, cache: int = 100) -> PeerSpan:
    record = ServerRecord(ServerState.ONLINE, start, end, "127.0.0.1:1", "float32", "1", cache_tokens_left=cache)
    return PeerSpan(peer_id, record)


def test_fewest_hops_prefers_long_spans():
    spans = [span("a", 0, 2), span("b", 2, 4), span("c", 1, 8), span("d", 0, 1), span("e", 6, 8)]
    chain = fewest_hops_chain(spans, 0, 8)
    assert [(hop.peer.peer_id, hop.start, hop.end) for hop in chain] == [("a", 0, 2), ("c", 2, 8)]


def test_chain_over_subrange_and_missing_blocks():
    spans = [span("a", 0, 3), span("b", 5, 8)]
    assert [(h.start, h.end) for h in fewest_hops_chain(spans, 1, 2)] == [(1, 2)]
    with pytest.raises(MissingBlocksError, match=r"block\(s\) 3-4 of model 'm'") as error:
        fewest_hops_chain(spans, 0, 8, "m")
    assert error.value.missing_blocks == [3, 4]


def test_record_round_trip_and_garbage():
    record = span("a", 0, 2).record
    assert ServerRecord.from_dict(record.to_dict()) == record
    for garbage in (None, 5, "x", {"state": 2}, {**record.to_dict(), "state": 17}, {**record.to_dict(), "start_block": "z"}):
        assert ServerRecord.from_dict(garbage) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_round_trip(dtype):
    value = (torch.randn(2, 3, 5) * 10).to(dtype)
    assert torch.equal(tensors.decode(tensors.encode(value)), value)
    assert tensors.decode(tensors.encode(value[:, 1:, ::2])).shape == (2, 2, 3)


def test_tensor_decode_rejects_lies():
    message = tensors.encode(torch.zeros(4))
    message.shape[:] = [5]
    with pytest.raises(tensors.TensorDecodeError, match="needs 20 bytes, got 16"):
        tensors.decode(message)
    message.shape[:] = [-4]
    with pytest.raises(tensors.TensorDecodeError, match="negative"):
        tensors.decode(message)


def test_cache_pool_waits_and_times_out():
    async def scenario():
        pool = CachePool(num_pages=100, page_size=16)
        with pytest.raises(CacheExhaustedError, match="whole pool"):
            async with pool.reserve(101, timeout=1):
                pass
        async with pool.reserve(80, timeout=1) as pages:
            assert len(set(pages)) == 80 and pool.free_tokens == 20 * 16
            with pytest.raises(CacheExhaustedError, match="stayed full"):
                async with pool.reserve(30, timeout=0.1):
                    pass
            waiter = asyncio.create_task(_hold(pool, 30))
            await asyncio.sleep(0.05)
            assert not waiter.done()
        await asyncio.wait_for(waiter, 1)
        assert pool.free_tokens == 100 * 16

    asyncio.run(scenario())


async def _hold(pool: CachePool, num_pages: int) -> None:
    async with pool.reserve(num_pages, timeout=5) as pages:
        assert len(pages) == num_pages


def test_cache_pool_zero_timeout_takes_free_room_at_once():
    async def scenario():
        pool = CachePool(num_pages=8, page_size=16)
        async with pool.reserve(1, timeout=0) as pages:
            assert len(pages) == 1
            with pytest.raises(CacheExhaustedError, match="stayed full for 0.0s"):
                async with pool.reserve(8, timeout=0):
                    pass
        assert pool.free_tokens == 8 * 16

    asyncio.run(scenario())


def test_cache_pool_serves_waiting_sessions_in_order():
    """612 of 1024 tokens held, 512 waiting: a later 128 waits behind it (else small sessions starve large ones)."""

    async def scenario():
        pool = CachePool(num_pages=64, page_size=16)
        granted: list[str] = []
        release = {name: asyncio.Event() for name in ("held", "large", "small")}

        async def session(name: str, pages: int, timeout: float = 5.0) -> None:
            async with pool.reserve(pages, timeout):
                granted.append(name)
                await release[name].wait()

        tasks = [asyncio.create_task(session("held", 39))]  # 624 tokens held, 400 free
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(session("large", 32)))  # 512: waits for the held session
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(session("small", 8)))  # 128 would fit now, but comes after the large one
        await asyncio.sleep(0.05)
        assert granted == ["held"]
        with pytest.raises(CacheExhaustedError, match="2 session"):  # nor may a zero-timeout request jump the line
            async with pool.reserve(1, timeout=0):
                pass
        release["held"].set()
        await asyncio.sleep(0.05)
        assert granted == ["held", "large", "small"]
        release["large"].set(), release["small"].set()
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        assert pool.free_tokens == 64 * 16

    asyncio.run(scenario())


def test_cache_pool_a_waiter_that_gives_up_lets_the_next_in():
    async def scenario():
        pool = CachePool(num_pages=10, page_size=16)
        async with pool.reserve(6, timeout=0):
            impatient = asyncio.create_task(_hold_for(pool, 8, timeout=0.1))
            await asyncio.sleep(0.01)
            patient = asyncio.create_task(_hold_for(pool, 4, timeout=5))
            await asyncio.sleep(0.01)
            assert not patient.done()
            with pytest.raises(CacheExhaustedError):
                await impatient
            await asyncio.wait_for(patient, 1)  # 4 fit beside the 6 held once the 8 in front of it gave up
            cancelled = asyncio.create_task(_hold_for(pool, 8, timeout=5))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            async with pool.reserve(4, timeout=0):  # the cancelled waiter left the line
                pass
        assert pool.free_tokens == 10 * 16

    asyncio.run(scenario())


async def _hold_for(pool: CachePool, num_pages: int, timeout: float) -> None:
    async with pool.reserve(num_pages, timeout):
        pass


def test_lowest_cost_chain_avoids_slow_peers_and_extra_hops():
    spans = [span("slow", 0, 4), span("fast-a", 0, 2), span("fast-b", 2, 4), span("fast", 0, 4)]
    delay = {"slow": 50.0, "fast-a": 1.0, "fast-b": 1.0, "fast": 1.0}
    cost = lambda peer, start, end: delay[peer.peer_id] + 0.1 * (end - start)  # noqa: E731
    assert [hop.peer.peer_id for hop in lowest_cost_chain(spans, 0, 4, cost)] == ["fast"]
    assert [(h.start, h.end) for h in lowest_cost_chain(spans, 1, 3, cost)] == [(1, 3)]
    # A slow peer is left halfway when a fast one takes over from there.
    mixed = [span("slow", 0, 4), span("fast-b", 2, 4)]
    assert [(h.peer.peer_id, h.start, h.end) for h in lowest_cost_chain(mixed, 0, 4, lambda p, s, e: delay[p.peer_id] * (e - s))] == [
        ("slow", 0, 2), ("fast-b", 2, 4)]
    with pytest.raises(MissingBlocksError):
        lowest_cost_chain([span("a", 0, 1)], 0, 2, cost)


def test_a_second_opinion_leaves_peers_for_a_third():
    # Two disjoint chains, a-b and d-c; the fastest mix of them (a then c) would leave no chain for a third opinion.
    spans = [span("a", 0, 2), span("b", 2, 4), span("d", 0, 1), span("c", 1, 4)]
    delay = {"a": 1.0, "b": 3.0, "d": 2.0, "c": 1.0}
    cost = lambda peer, start, end: delay[peer.peer_id]  # noqa: E731
    assert [hop.peer.peer_id for hop in lowest_cost_chain(spans, 0, 4, cost)] == ["a", "c"]
    assert [hop.peer.peer_id for hop in chain_leaving_another(spans, 0, 4, cost)] == ["d", "c"]  # 3 beats a-b's 4
    # Where no chain leaves another, the fastest one is still the answer.
    assert [hop.peer.peer_id for hop in chain_leaving_another(spans[:3], 0, 4, cost)] == ["a", "b"]


def test_spread_chain_uses_replicas_by_throughput():
    replicas = [
        PeerSpan(name, ServerRecord(ServerState.ONLINE, 0, 2, "x:1", "float32", "1", throughput=throughput))
        for name, throughput in (("a", 100.0), ("b", 100.0), ("c", 1e-9))
    ]
    rng = __import__("random").Random(0)
    picks = [spread_chain(replicas, 0, 2, rng)[0].peer.peer_id for _ in range(400)]
    assert 150 < picks.count("a") < 250 and 150 < picks.count("b") < 250 and picks.count("c") < 5


def test_routing_prefers_peers_with_cache_room():
    spans = [span("full", 0, 4, cache=16), span("roomy-a", 0, 2, cache=4096), span("roomy-b", 2, 4, cache=4096)]
    assert [s.peer_id for s in with_cache_room(spans, 0, 4, 1024)] == ["roomy-a", "roomy-b"]
    assert [s.peer_id for s in with_cache_room(spans[:2], 0, 4, 1024)] == ["full", "roomy-a"]  # none else for 2:4
    assert len(with_cache_room(spans, 0, 4, 0)) == 3


def test_parameters_moved_to_huge_pages_keep_values_and_ties():
    embeddings = torch.nn.Embedding(100, 48)
    model = torch.nn.ModuleDict({"embed": embeddings, "head": torch.nn.Linear(48, 100, bias=False)})
    model["head"].weight = embeddings.weight  # tied, as in small LMs
    extra = torch.nn.Linear(48, 7)
    model["extra"] = extra
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    huge_pages.move_parameters(model)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert model["head"].weight is embeddings.weight
    if huge_pages.supported():
        assert embeddings.weight.data_ptr() % huge_pages.HUGE_PAGE == 0
        assert extra.weight.data_ptr() % 64 == 0 and extra.bias.data_ptr() % 64 == 0
    cache = huge_pages.empty((3, 5, 8), torch.bfloat16)
    assert cache.shape == (3, 5, 8) and cache.dtype == torch.bfloat16
    cache.fill_(1.5)
    assert float(cache.float().sum()) == 1.5 * 3 * 5 * 8


def test_stream_watchdog_cancels_late_calls_and_says_so():
    class Call:
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    watchdog = StreamWatchdog(tick=0.01)
    late, prompt = Call(), Call()
    watchdog.arm(late, 0.05)
    watchdog.arm(prompt, 60)
    time.sleep(0.3)
    assert watchdog.disarm(late) and late.cancelled == 1  # fired: the caller reports DEADLINE_EXCEEDED
    assert not watchdog.disarm(prompt) and prompt.cancelled == 0
    watchdog.arm(late, 60)  # armed again after disarm: the old deadline is gone for good
    time.sleep(0.1)
    assert not watchdog.disarm(late) and late.cancelled == 1

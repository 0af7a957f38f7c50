"""Pure parts: routing math, tensor encoding, record parsing, the cache pool."""

import asyncio

import pytest
import torch

from peer.memory_pool import CacheExhaustedError, CachePool
from swarm import tensors
from swarm.dht_records import PeerSpan, ServerRecord, ServerState
from swarm.errors import MissingBlocksError
from swarm.routing import fewest_hops_chain


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
        pool = CachePool(100)
        with pytest.raises(CacheExhaustedError, match="whole pool"):
            async with pool.reserve(101, timeout=1):
                pass
        async with pool.reserve(80, timeout=1):
            with pytest.raises(CacheExhaustedError, match="stayed full"):
                async with pool.reserve(30, timeout=0.1):
                    pass
            waiter = asyncio.create_task(_hold(pool, 30))
            await asyncio.sleep(0.05)
            assert not waiter.done()
        await asyncio.wait_for(waiter, 1)
        assert pool.used_bytes == 0

    asyncio.run(scenario())


async def _hold(pool: CachePool, num_bytes: int) -> None:
    async with pool.reserve(num_bytes, timeout=5):
        assert pool.used_bytes == num_bytes

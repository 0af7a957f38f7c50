"""Keeps this peer's records in the DHT fresh; records expire by themselves if the peer dies."""

import asyncio
import logging
import time
from collections.abc import Callable

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.constants import MODEL_INDEX_KEY
from swarm.dht_records import ServerRecord, block_key
from swarm.net.reachability import RENDEZVOUS_KEY

logger = logging.getLogger(__name__)

MIN_ANNOUNCE_GAP = 1.0
STORE_RETRY_PAUSE = 0.5  # doubled after each try that left a key unstored


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        subkey: bytes,
        model_prefix: str,
        model_info: dict,
        record: Callable[[], ServerRecord],
        period: float,
        rendezvous: Callable[[], dict | None] = lambda: None,
    ):
        self.dht, self.subkey, self.model_prefix, self.model_info = dht, subkey, model_prefix, model_info
        self.record, self.period = record, period
        self.rendezvous = rendezvous  # what we offer others (dial-backs, a relay), if anything
        self._wake = asyncio.Event()
        self._announced_blocks: set[int] = set()

    def announce_soon(self) -> None:
        """Ask for an announcement now (e.g. the cache filled up) instead of at the next period."""
        self._wake.set()

    async def announce(self, timeout: float | None = None) -> None:
        """Stores our records; waits at most `timeout` seconds (default: a period) for the DHT to take them."""
        record = self.record()
        expiration_time = get_dht_time() + 2 * self.period
        # After a move, the old blocks get the new record too: it names the new span, so no reader routes there.
        blocks = set(range(record.start_block, record.end_block))
        keys = [block_key(self.model_prefix, block) for block in sorted(blocks | self._announced_blocks)]
        self._announced_blocks = blocks
        values = {key: record.to_dict() for key in keys}
        if (rendezvous := self.rendezvous()) is not None:
            values[RENDEZVOUS_KEY] = rendezvous
        timeout = self.period if timeout is None else timeout
        await asyncio.get_running_loop().run_in_executor(None, self._store, values, expiration_time, timeout)

    def _store(self, values: dict[str, dict], expiration_time: float, timeout: float) -> None:
        """Stores `values` on other DHT nodes (a copy on our own node only counts when we know of no other: a
        node that has just joined is not yet in others' routing tables, so readers may never ask it). A key no node
        took (every replica timed out: a loaded machine, nodes that just left) is stored again after a short pause
        while time is left, so that no reader misses a peer for a whole period."""
        deadline = time.monotonic() + timeout  # a dead DHT process never answers: never wait on it unbounded
        # The model's index entry is shared by every peer of the model: a refusal only means that another peer's
        # entry lasts longer, so it is waited for but not judged.
        index = self.dht.store(
            MODEL_INDEX_KEY, subkey=self.model_prefix.encode(), value=self.model_info,
            expiration_time=expiration_time, return_future=True,
        )
        pending, pause = dict(values), STORE_RETRY_PAUSE
        while True:
            elsewhere = _result(self.dht.run_coroutine(_knows_other_nodes, return_future=True), deadline, True)
            own = {
                key: self.dht.store(key, subkey=self.subkey, value=value, expiration_time=expiration_time,
                                    exclude_self=elsewhere, return_future=True)
                for key, value in pending.items()
            }
            pending = {key: values[key] for key, future in own.items() if not _result(future, deadline, False)}
            if not pending or _left(deadline) < pause:
                break
            time.sleep(pause)
            pause *= 2
        _result(index, deadline, False)
        if pending:
            logger.warning(f"DHT records {list(pending)} were not stored; will retry at the next announcement")

    async def run(self) -> None:
        """Announce every `period` seconds (or sooner when asked) until cancelled."""
        while True:
            try:
                await self.announce()
            except Exception as error:  # a DHT hiccup must not take the peer down; the next period retries
                logger.warning(f"announcement failed: {error!r}")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.period)
                await asyncio.sleep(min(MIN_ANNOUNCE_GAP, self.period))  # many sessions opening at once: one store
            except TimeoutError:
                pass


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _result(future, deadline: float, otherwise):
    """The future's result, or `otherwise` if it has none by the deadline (the DHT is slow, or dead)."""
    try:
        return future.result(timeout=_left(deadline))
    except TimeoutError:
        return otherwise


async def _knows_other_nodes(_dht: hivemind.DHT, node: DHTNode) -> bool:
    return len(node.protocol.routing_table.uid_to_peer_id) > 0

"""The peers this peer may dial: only those the swarm's signed records announce, at the address they announce.

A client names a push target by identity; the peer looks it up here instead of dialling whatever a request says,
so nobody can make a peer open connections to an arbitrary host:port.
"""

import asyncio
import time
from collections.abc import Callable

from swarm.dht_records import PeerSpan, ServerState

# A miss re-reads the swarm (a peer that just joined): for the same target at most once a second, and at most ten
# times a second in all (a client naming a new bogus target every step costs the DHT no more).
TARGET_REFRESH_GAP = 1.0
MIN_REFRESH_GAP = 0.1


class PushRefused(Exception):
    """The client asked us to push somewhere no record announces."""


class PeerDirectory:
    def __init__(self, read_swarm: Callable[[], list[PeerSpan]]):
        self._read_swarm = read_swarm  # blocking: a DHT read
        self._spans: dict[str, PeerSpan] = {}
        self._read_at = -float("inf")
        self._missed_at: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def update(self, spans: list[PeerSpan]) -> None:
        """Takes the online peers among `spans` (a joining peer announces no address yet)."""
        self._spans = {span.peer_id: span for span in spans if span.record.state == ServerState.ONLINE}
        self._read_at = time.monotonic()

    async def next_hop(self, peer_id: str, block: int) -> PeerSpan:
        """The announced peer `peer_id`, if it serves `block` (the one after the pushing session's span)."""
        span = self._spans.get(peer_id)
        if not _serves(span, block):
            async with self._lock:
                now = time.monotonic()
                if now - self._read_at > MIN_REFRESH_GAP and now - self._missed_at.get(peer_id, -1e9) > TARGET_REFRESH_GAP:
                    if len(self._missed_at) > 1024:
                        self._missed_at.clear()
                    self._missed_at[peer_id] = now
                    self.update(await asyncio.get_running_loop().run_in_executor(None, self._read_swarm))
            span = self._spans.get(peer_id)
        if span is None:
            raise PushRefused(f"push target {peer_id!r} is not announced online in the swarm")
        if not _serves(span, block):
            raise PushRefused(f"push target {peer_id!r} is announced for blocks {span.start}:{span.end}, not block {block}")
        return span


def _serves(span: PeerSpan | None, block: int) -> bool:
    return span is not None and span.start <= block < span.end

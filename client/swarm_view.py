"""The client's view of the swarm: which peers serve which blocks, read from the DHT, and chains through them."""

import logging
import time

import hivemind

from client.config import ClientConfig
from swarm.constants import PROTOCOL_VERSION
from swarm.dht_records import PeerSpan, fetch_peer_spans
from swarm.errors import MissingBlocksError
from swarm.routing import Hop, fewest_hops_chain

logger = logging.getLogger(__name__)


class SwarmView:
    def __init__(self, model_prefix: str, num_blocks: int, config: ClientConfig, dht: hivemind.DHT | None = None):
        self.model_prefix, self.num_blocks, self.config = model_prefix, num_blocks, config
        self.dht = dht or hivemind.DHT(initial_peers=config.initial_peers, client_mode=True, start=True)
        self._spans: list[PeerSpan] = []
        self._fetched_at = -float("inf")
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures so far)

    def ban(self, peer_id: str) -> None:
        """Avoid a peer that failed, for longer each time it fails again."""
        _, failures = self._bans.get(peer_id, (0.0, 0))
        duration = min(self.config.ban_seconds * 2**failures, self.config.max_ban_seconds)
        self._bans[peer_id] = (time.monotonic() + duration, failures + 1)
        logger.warning(f"peer {peer_id} failed; avoiding it for {duration:.0f}s")

    def is_banned(self, peer_id: str) -> bool:
        return self._bans.get(peer_id, (0.0, 0))[0] > time.monotonic()

    def peer_spans(self, refresh: bool = False) -> list[PeerSpan]:
        """Online peers of this model that speak our protocol and pass the allowed/blocked filters."""
        if refresh or time.monotonic() - self._fetched_at > self.config.view_ttl:
            spans = fetch_peer_spans(self.dht, self.model_prefix, self.num_blocks)
            self._spans = [span for span in spans if self._usable(span)]
            self._fetched_at = time.monotonic()
        return self._spans

    def _usable(self, span: PeerSpan) -> bool:
        if span.record.version != PROTOCOL_VERSION:
            return False
        if self.config.allowed_peers and span.peer_id not in self.config.allowed_peers:
            return False
        return span.peer_id not in self.config.blocked_peers

    def chain(self, start: int = 0, end: int | None = None) -> list[Hop]:
        """The shortest chain over blocks [start, end); looks again at the DHT before declaring blocks missing."""
        end = self.num_blocks if end is None else end
        try:
            return fewest_hops_chain(self._unbanned(self.peer_spans()), start, end, self.model_prefix)
        except MissingBlocksError:
            return fewest_hops_chain(self._unbanned(self.peer_spans(refresh=True)), start, end, self.model_prefix)

    def _unbanned(self, spans: list[PeerSpan]) -> list[PeerSpan]:
        return [span for span in spans if not self.is_banned(span.peer_id)]

    def shutdown(self) -> None:
        self.dht.shutdown()

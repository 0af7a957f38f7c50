"""The client's view of the swarm: which peers serve which blocks, read from the DHT, and chains through them."""

import logging
import time

import hivemind

from client.config import ClientConfig
from swarm.constants import PROTOCOL_VERSION
from swarm.dht_records import PeerSpan, fetch_peer_spans
from swarm.routing import Hop, fewest_hops_chain

logger = logging.getLogger(__name__)


class SwarmView:
    def __init__(self, model_prefix: str, num_blocks: int, config: ClientConfig, dht: hivemind.DHT | None = None):
        self.model_prefix, self.num_blocks, self.config = model_prefix, num_blocks, config
        self.dht = dht or hivemind.DHT(initial_peers=config.initial_peers, client_mode=True, start=True)
        self._spans: list[PeerSpan] = []
        self._fetched_at = -float("inf")

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
            return fewest_hops_chain(self.peer_spans(), start, end, self.model_prefix)
        except Exception:
            return fewest_hops_chain(self.peer_spans(refresh=True), start, end, self.model_prefix)

    def shutdown(self) -> None:
        self.dht.shutdown()

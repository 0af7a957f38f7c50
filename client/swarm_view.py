"""The client's view of the swarm: which peers serve which blocks, read from the DHT, and chains through them."""

import logging
import math
import random
import time

import grpc
import hivemind

from client.config import ClientConfig
from client.transport import PeerConnections
from swarm.identity import swarm_dht
from swarm.constants import PROTOCOL_VERSION
from swarm.dht_records import PeerSpan, fetch_peer_spans
from swarm.errors import MissingBlocksError, RemoteError
from swarm.routing import Hop, lowest_cost_chain, spread_chain
from swarm.wire import swarm_peer_pb2 as pb

logger = logging.getLogger(__name__)


# Routing costs, in seconds: a fixed price per hop (so fewer hops win ties), how long a measured round trip is
# trusted, and what an unreachable peer costs.
HOP_PENALTY = 1e-3
RTT_TTL = 30.0
UNREACHABLE = 1e3


class SwarmView:
    def __init__(
        self,
        model_prefix: str,
        num_blocks: int,
        config: ClientConfig,
        connections: PeerConnections,
        dht: hivemind.DHT | None = None,
    ):
        self.model_prefix, self.num_blocks, self.config = model_prefix, num_blocks, config
        self.connections = connections
        self.dht = dht or swarm_dht(initial_peers=config.initial_peers, client_mode=True, start=True)[0]
        self._rtts: dict[str, tuple[float, float]] = {}  # peer id -> (round trip seconds, measured at)
        self._rng = random.Random()
        self._spans: list[PeerSpan] = []
        self._fetched_at = -float("inf")
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures so far)

    def ban(self, peer_id: str, reason: RemoteError) -> None:
        """Avoid a peer that failed, for longer each time it fails again."""
        _, failures = self._bans.get(peer_id, (0.0, 0))
        duration = min(self.config.ban_seconds * 2**failures, self.config.max_ban_seconds)
        self._bans[peer_id] = (time.monotonic() + duration, failures + 1)
        logger.warning(f"peer {peer_id} failed ({reason.code}: {reason.message}); avoiding it for {duration:.0f}s")

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

    def chain(self, start: int = 0, end: int | None = None, purpose: str = "inference") -> list[Hop]:
        """A chain over blocks [start, end): for "inference" the lowest expected latency per step (measured round
        trips plus announced compute speed, a penalty per hop); for "training" a throughput-weighted random draw
        that spreads forward/backward load over replicas. Looks again at the DHT before declaring blocks missing."""
        end = self.num_blocks if end is None else end
        try:
            return self._choose(self._unbanned(self.peer_spans()), start, end, purpose)
        except MissingBlocksError:
            return self._choose(self._unbanned(self.peer_spans(refresh=True)), start, end, purpose)

    def _choose(self, spans: list[PeerSpan], start: int, end: int, purpose: str) -> list[Hop]:
        if purpose == "training":
            return spread_chain(spans, start, end, self._rng, self.model_prefix)
        chain = lowest_cost_chain(spans, start, end, self._step_cost, self.model_prefix)
        logger.info("route: " + " -> ".join(f"{hop.peer.peer_id[-8:]}[{hop.start}:{hop.end})" for hop in chain))
        return chain

    def _step_cost(self, span: PeerSpan, start: int, end: int) -> float:
        """Seconds one inference step through blocks [start, end) of this peer is expected to take."""
        compute = (end - start) / (span.end - span.start) / max(span.record.throughput, 1e-3)
        return HOP_PENALTY + self.round_trip(span) + compute

    def round_trip(self, span: PeerSpan) -> float:
        """Measured (and cached) time of an Info call to the peer; an unreachable peer costs UNREACHABLE."""
        rtt, measured_at = self._rtts.get(span.peer_id, (0.0, -math.inf))
        if time.monotonic() - measured_at > RTT_TTL:
            started = time.perf_counter()
            try:
                self.connections.stub(span.record.address).Info(pb.InfoRequest(), timeout=self.config.ping_timeout)
                rtt = time.perf_counter() - started
            except grpc.RpcError:
                rtt = UNREACHABLE
            self._rtts[span.peer_id] = (rtt, time.monotonic())
        return rtt

    def _unbanned(self, spans: list[PeerSpan]) -> list[PeerSpan]:
        return [span for span in spans if not self.is_banned(span.peer_id)]

    def shutdown(self) -> None:
        self.dht.shutdown()

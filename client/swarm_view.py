"""The client's view of the swarm: which peers serve which blocks, read from the DHT, and chains through them."""

import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import hivemind

from client.config import ClientConfig
from client.transport import PeerConnections
from swarm.constants import PROTOCOL_VERSION, SPAN_MOVED_STATUS
from swarm.dht_node import InitialPeersError, swarm_dht, wait_joined
from swarm.dht_records import PeerSpan, fetch_peer_spans
from swarm.errors import MissingBlocksError, RemoteError
from swarm.routing import Hop, chain_leaving_another, lowest_cost_chain, spread_chain, with_cache_room
from swarm.wire import swarm_peer_pb2 as pb

logger = logging.getLogger(__name__)


# The answer that means the peer is fine but does not serve the blocks that its record, which we routed by, said:
# it moved (load balancing) since we read it. (OUT_OF_RANGE, a step past the session's max_length, is the caller's.)
STALE_ROUTE = {SPAN_MOVED_STATUS}
# Answers that mean the peer (not the request) failed.
PEER_FAILURES = {
    "UNAVAILABLE", "CANCELLED", "CLOSED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "PROTOCOL", "RESOURCE_EXHAUSTED",
}
# Either way, the call goes to another peer (inference: with the hop's history replayed).
RETRYABLE = PEER_FAILURES | STALE_ROUTE

# Routing costs, in seconds: a fixed price per hop (so fewer hops win ties), how long a measured round trip is
# trusted, and what an unreachable peer costs.
HOP_PENALTY = 1e-3
RTT_TTL = 30.0
UNREACHABLE = 1e3
# Weight of the newest decode step in a peer's measured compute time (an exponential moving average).
MEASURED_STEP_WEIGHT = 0.3
PING_WORKERS = 8  # round trips measured at once by the background refresh


def _where(span: PeerSpan) -> str:
    return f"relay {span.record.relay}" if span.record.relay else span.record.address


class SwarmView:
    def __init__(
        self,
        model_prefix: str,
        num_blocks: int,
        config: ClientConfig,
        connections: PeerConnections,
        dht: hivemind.DHT | None = None,
        join_in_background: bool = False,
    ):
        """With `join_in_background`, the view's DHT node joins the swarm while the caller goes on (building its
        model): `wait_joined` then says whether it could. Else it has joined when this returns."""
        self.model_prefix, self.num_blocks, self.config = model_prefix, num_blocks, config
        self.connections = connections
        if dht is None and not config.initial_peers:  # else a lone DHT node that finds no peer, and a wrong hint
            raise InitialPeersError("initial_peers is empty: give the multiaddr of a DHT node of the swarm, e.g. "
                                    "initial_peers=['/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW...'] (what "
                                    "`swarm-peer bootstrap` printed)")
        self._joined = threading.Event()
        self._join_error: BaseException | None = None
        if dht is None:
            dht = swarm_dht(initial_peers=config.initial_peers, client_mode=True, start=True,
                            await_joined=not join_in_background)[0]
        else:
            join_in_background = False
        self.dht = dht
        if not join_in_background:
            self._joined.set()
        self._rtts: dict[str, tuple[float, float]] = {}  # peer id -> (round trip seconds, measured at)
        # peer id -> seconds of compute per block of a decode step, as this client measured them
        self._block_seconds: dict[str, float] = {}
        self._rng = random.Random()
        self._spans: list[PeerSpan] | None = None
        self._dht_lock = threading.Lock()  # the view reads the DHT from two threads; one request at a time
        # peer id -> (banned until, failures so far, the run of the peer that failed: its announced start time)
        self._bans: dict[str, tuple[float, int, float]] = {}
        # peer id -> (avoided until, times caught): peers caught answering wrong; a restart does not clear this
        self._convictions: dict[str, tuple[float, int]] = {}
        self._checks_passed: dict[str, int] = {}  # peer id -> checks of its answers it passed with this client
        self._stopping = threading.Event()
        self._background_calls = threading.Lock()  # held while the refresh thread's pings are in flight
        threading.Thread(target=self._refresh_forever, name="swarm-view", daemon=True).start()

    def ban(self, peer_id: str, reason: RemoteError) -> None:
        """Avoid a peer that failed, for longer each time it fails again (a restarted peer starts afresh)."""
        _, failures, _ = self._bans.get(peer_id, (0.0, 0, 0.0))
        duration = min(self.config.ban_seconds * 2**failures, self.config.max_ban_seconds)
        self._bans[peer_id] = (time.monotonic() + duration, failures + 1, self._started_at(peer_id))
        logger.warning(f"peer {peer_id} failed ({reason.code}: {reason.message}); avoiding it for {duration:.0f}s")

    def convict(self, peer_id: str, evidence: str) -> None:
        """Avoid a peer caught answering wrong (outvoted by other peers on the same inputs), for long, and longer
        each time; unlike a failure, restarting under the same identity does not lift it."""
        _, convictions = self._convictions.get(peer_id, (0.0, 0))
        duration = min(self.config.liar_ban_seconds * 2**convictions, self.config.max_liar_ban_seconds)
        self._convictions[peer_id] = (time.monotonic() + duration, convictions + 1)
        self._checks_passed.pop(peer_id, None)
        logger.warning(f"peer {peer_id} answered wrong ({evidence}); avoiding it for {duration:.0f}s")

    def passed_check(self, peer_id: str) -> None:
        self._checks_passed[peer_id] = self._checks_passed.get(peer_id, 0) + 1

    def is_trusted(self, peer_id: str) -> bool:
        """Whether a peer is through its probation (config.verify_probation checks passed): its answers are then
        only spot-checked (config.spot_check_rate)."""
        return self._checks_passed.get(peer_id, 0) >= self.config.verify_probation

    def is_convicted(self, peer_id: str) -> bool:
        return self._convictions.get(peer_id, (0.0, 0))[0] > time.monotonic()

    def handle_failure(self, error: RemoteError, attempt: int) -> None:
        """After a call failed with a RETRYABLE code: ban a failed peer; if it only moved, read the swarm again
        (after a short pause that grows with the attempts: its new record may still be on its way)."""
        if error.code in STALE_ROUTE:
            time.sleep(min(0.1 * 2**attempt, 1.0))
            self.peer_spans(refresh=True)
        else:
            self.ban(error.peer, error)

    def is_banned(self, peer_id: str) -> bool:
        if self.is_convicted(peer_id):
            return True
        until, _, started_at = self._bans.get(peer_id, (0.0, 0, 0.0))
        if self._started_at(peer_id) > started_at:  # it restarted since it failed: a new run under the same identity
            return False
        return until > time.monotonic()

    def _started_at(self, peer_id: str) -> float:
        return next((span.record.started_at for span in self._spans or [] if span.peer_id == peer_id), 0.0)

    def wait_joined(self) -> None:
        """Returns once the view's DHT node has joined the swarm; raises why it could not (its node is then shut)."""
        self._joined.wait()
        if self._join_error is not None:
            raise self._join_error

    def _join(self) -> None:
        if not self._joined.is_set():
            try:
                wait_joined(self.dht)
            except BaseException as error:  # for wait_joined's caller; the refresh thread ends
                self._join_error = error
            self._joined.set()

    def peer_spans(self, refresh: bool = False) -> list[PeerSpan]:
        """Online peers of this model that speak our protocol and pass the allowed/blocked filters; kept fresh by a
        background thread, read from the DHT here only the first time or when asked to."""
        if not refresh and self._spans is not None:  # never waits for a background refresh under way
            return self._spans
        self.wait_joined()
        with self._dht_lock:  # a caller finding the first read under way waits for it rather than read again
            if refresh or self._spans is None:
                spans = fetch_peer_spans(self.dht, self.model_prefix, self.num_blocks)
                self._spans = [span for span in spans if self._usable(span)]
        return self._spans

    def _refresh_forever(self) -> None:
        """Reads the swarm and measures the round trips to its peers at once (while the client builds its model, so
        that the first chain finds them ready), then re-reads it and re-measures round trips that are getting old
        every refresh period, so that choosing a chain never waits for the DHT or for pings. A node joining in the
        background joins here first."""
        self._join()
        if self._join_error is not None:
            return
        refresh = False
        with ThreadPoolExecutor(max_workers=PING_WORKERS, thread_name_prefix="swarm-ping") as pings:
            while not self._stopping.is_set():
                try:
                    spans, checked_at = self.peer_spans(refresh=refresh), time.monotonic()
                    stale = [span for span in spans
                             if checked_at - self._rtts.get(span.peer_id, (0.0, -math.inf))[1] > RTT_TTL / 2]
                    with self._background_calls:
                        list(pings.map(lambda span: self._measure_round_trip(span, since=checked_at), stale))
                except Exception as error:  # the DHT may be unreachable for a while; the next period tries again
                    logger.debug(f"refreshing the view of the swarm failed: {error!r}")
                refresh = True
                self._stopping.wait(self.config.refresh_period)

    def _usable(self, span: PeerSpan) -> bool:
        if span.record.version != PROTOCOL_VERSION:
            return False
        if self.config.allowed_peers and span.peer_id not in self.config.allowed_peers:
            return False
        return span.peer_id not in self.config.blocked_peers

    def chain(
        self, start: int = 0, end: int | None = None, purpose: str = "inference", cache_tokens: int = 0,
        exclude: frozenset[str] = frozenset(), quantization: str | None = None,
    ) -> list[Hop]:
        """A chain over blocks [start, end): for "inference" the lowest expected latency per step (measured round
        trips plus announced compute speed, a penalty per hop) over peers with `cache_tokens` of cache free, if
        those cover the blocks; for "referee" (a second opinion, no cache) the same among chains that leave another
        chain over the blocks for a third opinion; for "training" a throughput-weighted random draw that spreads
        forward/backward load over replicas. Never through the peers in `exclude`; only through peers whose weights
        are stored as `quantization` says ("any", "none", "int8", "nf4"; default: the client's config). Looks again
        at the DHT before declaring blocks missing (except for a referee, whose check is skipped instead)."""
        end = self.num_blocks if end is None else end
        quantization = quantization or self.config.quantization
        try:
            return self._choose(self._unbanned(self.peer_spans(), exclude), start, end, purpose, cache_tokens, quantization)
        except MissingBlocksError:
            if purpose == "referee":  # a second opinion is best effort: the background refresh finds peers that joined
                raise
        try:
            spans = self._unbanned(self.peer_spans(refresh=True), exclude)
            return self._choose(spans, start, end, purpose, cache_tokens, quantization)
        except MissingBlocksError as error:
            raise MissingBlocksError(
                self.model_prefix, error.missing_blocks, self.config.active_adapter, quantization
            ) from None

    def replacement_chain(self, hop: Hop, exclude: frozenset[str] = frozenset()) -> list[Hop]:
        """A chain over the hop's blocks to replace its (failed) peer: through peers that store their weights as it
        does while the swarm has any (answers stay comparable), else as the config allows, which is logged."""
        try:
            return self.chain(hop.start, hop.end, exclude=exclude, quantization=hop.peer.record.quantization)
        except MissingBlocksError:
            chain = self.chain(hop.start, hop.end, exclude=exclude)
            logger.warning(
                f"no other peer serves blocks {hop.start}:{hop.end} with {hop.peer.record.quantization} weights: "
                f"continuing on {[h.peer.record.quantization for h in chain]} weights"
            )
            return chain

    def _choose(
        self, spans: list[PeerSpan], start: int, end: int, purpose: str, cache_tokens: int, quantization: str
    ) -> list[Hop]:
        if self.config.active_adapter:
            spans = [span for span in spans if self.config.active_adapter in span.record.adapters]
        if quantization != "any":
            spans = [span for span in spans if span.record.quantization == quantization]
        if purpose == "training":
            return spread_chain(spans, start, end, self._rng, self.model_prefix)
        if purpose == "referee":
            chain = chain_leaving_another(spans, start, end, self._step_cost, self.model_prefix)
        else:
            spans = with_cache_room(spans, start, end, cache_tokens)
            chain = lowest_cost_chain(spans, start, end, self._step_cost, self.model_prefix)
        route = " -> ".join(
            f"{hop.peer.record.public_name or hop.peer.peer_id[:10]}@{_where(hop.peer)}[{hop.start}:{hop.end})"
            for hop in chain
        )
        logger.log(logging.WARNING if self.config.show_route else logging.DEBUG, f"route: {route}")
        return chain

    def observe_step(self, span: PeerSpan, blocks: int, seconds: float) -> None:
        """A decode step we sent to the peer through `blocks` of its blocks was answered after `seconds`: less the
        round trip, what the peer really takes (its queue included), which routing believes over its record."""
        compute = max(seconds - self._rtts.get(span.peer_id, (0.0, 0.0))[0], 0.0) / blocks
        previous = self._block_seconds.get(span.peer_id, compute)
        self._block_seconds[span.peer_id] = previous + MEASURED_STEP_WEIGHT * (compute - previous)

    def _step_cost(self, span: PeerSpan, start: int, end: int) -> float:
        """Seconds one inference step through blocks [start, end) of this peer is expected to take: its compute as
        we measured it if we did (a peer may announce any throughput), else as its record announces."""
        measured = self._block_seconds.get(span.peer_id)
        if measured is not None:
            compute = measured * (end - start)
        else:
            compute = (end - start) / (span.end - span.start) / max(span.record.throughput, 1e-3)
        relay_hop = HOP_PENALTY if span.record.relay else 0.0  # measured round trips include it; ties go direct
        return HOP_PENALTY + relay_hop + self.round_trip(span) + compute

    def round_trip(self, span: PeerSpan) -> float:
        """Measured (and cached) time of an Info call to the peer; an unreachable peer costs UNREACHABLE."""
        rtt, measured_at = self._rtts.get(span.peer_id, (0.0, -math.inf))
        if time.monotonic() - measured_at > RTT_TTL:
            rtt = self._measure_round_trip(span)
        return rtt

    def _measure_round_trip(self, span: PeerSpan, since: float | None = None) -> float:
        """Pings the peer; its figure is kept unless one newer than `since` (default: now) was found meanwhile."""
        since = time.monotonic() if since is None else since
        started = time.perf_counter()
        try:
            self.connections.stub(span).Info(pb.InfoRequest(), timeout=self.config.ping_timeout)
            rtt = time.perf_counter() - started
        except (grpc.RpcError, RemoteError):
            rtt = UNREACHABLE
        if self._rtts.get(span.peer_id, (0.0, -math.inf))[1] < since:
            self._rtts[span.peer_id] = (rtt, time.monotonic())
        return rtt

    @contextlib.contextmanager
    def no_background_calls(self) -> Iterator[None]:
        """Inside, none of the refresh thread's pings is in flight. Fork a process (a DHT node) only there: a fork
        while a gRPC call is in flight skips gRPC's fork handlers, and the child's libp2p daemon then failed to
        start ("Daemon failed to start: None", a collaborative optimizer beside a model that had just started)."""
        with self._background_calls:
            yield

    def _unbanned(self, spans: list[PeerSpan], exclude: frozenset[str] = frozenset()) -> list[PeerSpan]:
        return [span for span in spans if not self.is_banned(span.peer_id) and span.peer_id not in exclude]

    def shutdown(self) -> None:
        self._stopping.set()
        with self._dht_lock:
            self.dht.shutdown()

"""A snapshot of the swarm for people: its models, how each block is covered, and its peers.

`swarm-peer status` prints it and `swarm-peer monitor` serves it to the dashboard, so both show the same thing.
"""

import time
from dataclasses import asdict, dataclass, field

from swarm.coverage import block_servers, block_throughputs
from swarm.dht_records import PeerSpan, ServerState, fetch_models, fetch_peer_spans
from swarm.training_runs import RunProgress, fetch_run_progress, fetch_run_records


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    public_name: str
    state: str
    start: int
    end: int
    throughput: float
    network_throughput: float
    cache_tokens_left: int
    dtype: str
    quantization: str  # of its blocks' weights: none, int8, nf4
    version: str
    address: str
    next_pings: dict[str, float]
    moving_to: int | None
    adapters: list[str]
    relay: str  # the relay that reaches it ("" when it is dialled directly)
    reachability: str  # "direct" or "relayed"

    @classmethod
    def of(cls, span: PeerSpan) -> "PeerView":
        record = span.record
        return cls(
            span.peer_id, record.public_name, record.state.name.lower(), span.start, span.end, record.throughput,
            record.network_throughput, record.cache_tokens_left, record.dtype, record.quantization, record.version,
            record.address,
            record.next_pings, record.moving_to, list(record.adapters), record.relay,
            "relayed" if record.relay else "direct",
        )


@dataclass(frozen=True)
class ModelView:
    prefix: str
    name: str
    model_type: str
    num_blocks: int
    peers: list[PeerView]
    block_throughputs: list[float]  # tokens/s of each block from its online peers
    block_servers: list[int]  # online peers holding each block; 0 is a gap

    @property
    def gaps(self) -> list[int]:
        return [block for block, servers in enumerate(self.block_servers) if servers == 0]

    @property
    def health(self) -> str:
        if len(self.gaps) == self.num_blocks:
            return "down"
        return "gaps" if self.gaps else "healthy"

    def to_dict(self) -> dict:
        return dict(asdict(self), gaps=self.gaps, health=self.health)


@dataclass(frozen=True)
class SwarmSnapshot:
    taken_at: float  # unix time
    models: list[ModelView]
    training: list[RunProgress] = field(default_factory=list)  # collaborative training runs

    @property
    def health(self) -> str:
        healths = {model.health for model in self.models}
        return "empty" if not healths else "healthy" if healths == {"healthy"} else "degraded"

    def to_dict(self) -> dict:
        return {"taken_at": self.taken_at, "health": self.health, "models": [model.to_dict() for model in self.models],
                "training": [asdict(run) for run in self.training]}


def take_snapshot(dht) -> SwarmSnapshot:
    """Reads the model index and every model's records (all states; coverage counts online peers only)."""
    models = []
    for model in fetch_models(dht):
        spans = fetch_peer_spans(dht, model.prefix, model.num_blocks, states=tuple(ServerState))
        online = [span for span in spans if span.record.state == ServerState.ONLINE]
        models.append(ModelView(
            model.prefix, model.name, model.model_type, model.num_blocks, [PeerView.of(span) for span in spans],
            block_throughputs(online, model.num_blocks), block_servers(online, model.num_blocks),
        ))
    training = [fetch_run_progress(dht, record) for record in fetch_run_records(dht)]
    return SwarmSnapshot(time.time(), models, training)

"""What peers announce in the DHT and how it is keyed.

Key `{model_prefix}.{block}`, subkey the peer's signed identity (see `identity`), value a ServerRecord as a plain dict (msgpack-able).
Records expire by themselves, so a peer that dies silently disappears after its expiration.
"""

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from swarm.constants import MODEL_INDEX_KEY
from swarm.identity import identity_from_subkey, owner_public_key
from swarm.net.endpoints import Endpoint
from swarm.net.tls import certificate_matches


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


@dataclass(frozen=True)
class ServerRecord:
    state: ServerState
    start_block: int
    end_block: int
    address: str  # host:port of the peer's gRPC data plane; "" when only its relay reaches it
    dtype: str
    version: str
    quantization: str = "none"  # how its blocks' linear weights are stored: none (exact), int8, nf4
    throughput: float = 0.0  # tokens/s the peer computes through its span
    network_throughput: float = 0.0  # tokens/s its bandwidth carries (activations in and out); 0: unknown
    cache_tokens_left: int = 0
    public_name: str = ""
    adapters: tuple[str, ...] = ()
    next_pings: dict[str, float] = field(default_factory=dict)  # round trip (s) to peers serving its end block
    moving_to: int | None = None  # first block of the span it is loading to move there (load balancing)
    started_at: float = 0.0  # DHT time this run of the peer started: a restart under the same identity is a new peer
    certificate: bytes = b""  # the peer's TLS certificate (PEM), made from the key that signs this record
    relay: str = ""  # host:port of the relay that reaches the peer, when it is behind NAT

    @property
    def effective_throughput(self) -> float:
        """What the span can actually serve: the slower of compute and network."""
        return min(self.throughput, self.network_throughput) if self.network_throughput > 0 else self.throughput

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["state"] = int(self.state)
        record["adapters"] = list(self.adapters)
        return record

    @classmethod
    def from_dict(cls, record: Any) -> "ServerRecord | None":
        """Parses an announced value; anything malformed (another version, garbage) gives None, never an error."""
        try:
            return cls(
                state=ServerState(int(record["state"])),
                start_block=int(record["start_block"]),
                end_block=int(record["end_block"]),
                address=str(record["address"]),
                dtype=str(record["dtype"]),
                version=str(record["version"]),
                quantization=str(record.get("quantization", "none")),
                throughput=float(record.get("throughput", 0.0)),
                network_throughput=float(record.get("network_throughput", 0.0)),
                cache_tokens_left=int(record.get("cache_tokens_left", 0)),
                public_name=str(record.get("public_name", "")),
                adapters=tuple(str(name) for name in record.get("adapters", ())),
                next_pings={str(k): float(v) for k, v in dict(record.get("next_pings", {})).items()},
                moving_to=None if record.get("moving_to") is None else int(record["moving_to"]),
                started_at=float(record.get("started_at", 0.0)),
                certificate=bytes(record.get("certificate", b"")),
                relay=str(record.get("relay", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def block_key(model_prefix: str, block: int) -> str:
    return f"{model_prefix}.{block}"


@dataclass(frozen=True)
class PeerSpan:
    """A peer as routing sees it: which blocks it serves and what it announced."""

    peer_id: str
    record: ServerRecord

    @property
    def start(self) -> int:
        return self.record.start_block

    @property
    def end(self) -> int:
        return self.record.end_block

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.peer_id, self.record.certificate, self.record.address, self.record.relay)


def _valid_records(entry, num_blocks: int):
    """(peer id, expiration, record) of each well-formed, properly signed announcement in a block key's entry."""
    if entry is None or not isinstance(entry.value, dict):
        return
    for subkey, item in entry.value.items():
        peer_id = identity_from_subkey(subkey)  # unsigned records, or ones claiming another's identity: ignored
        record = ServerRecord.from_dict(item.value)
        if peer_id is None or record is None or not 0 <= record.start_block < record.end_block <= num_blocks:
            continue
        if not certificate_matches(record.certificate, owner_public_key(subkey)):
            continue  # a certificate not made from the signing key: whoever answers there is not this peer
        yield peer_id, item.expiration_time, record


def fetch_peer_spans(dht, model_prefix: str, num_blocks: int, states=(ServerState.ONLINE,)) -> list[PeerSpan]:
    """Every peer announcing blocks of the model in one of `states`, read from the DHT (one lookup per block).

    A peer that moved leaves records under its old blocks until they are overwritten or expire; its newest one
    (latest expiration) is the one that counts.
    """
    futures = [dht.get(block_key(model_prefix, block), latest=True, return_future=True) for block in range(num_blocks)]
    newest: dict[str, tuple[float, ServerRecord]] = {}
    for future in futures:
        for peer_id, expiration_time, record in _valid_records(future.result(), num_blocks):
            if peer_id not in newest or expiration_time > newest[peer_id][0]:
                newest[peer_id] = (expiration_time, record)
    spans = [PeerSpan(peer_id, record) for peer_id, (_, record) in newest.items() if record.state in states]
    return sorted(spans, key=lambda span: (span.start, span.peer_id))


def fetch_peer_record(dht, model_prefix: str, block: int, peer_id: str) -> PeerSpan | None:
    """One peer's announcement under `block`, if it is there and valid (whatever its state)."""
    entry = dht.get(block_key(model_prefix, block), latest=True)
    records = [record for found, _, record in _valid_records(entry, MAX_MODEL_BLOCKS) if found == peer_id]
    return PeerSpan(peer_id, records[0]) if records else None


MAX_MODEL_BLOCKS = 4096


@dataclass(frozen=True)
class ModelEntry:
    """A model of the model index: what peers serving it announce about it."""

    prefix: str
    name: str
    model_type: str
    num_blocks: int


def fetch_models(dht) -> list[ModelEntry]:
    """The models whose peers announce them (malformed entries are skipped)."""
    entry = dht.get(MODEL_INDEX_KEY, latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return []
    models = []
    for subkey, item in entry.value.items():
        info = item.value
        try:
            model = ModelEntry(subkey.decode(), str(info["name"]), str(info["model_type"]), int(info["num_blocks"]))
        except (AttributeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
            continue
        if 0 < model.num_blocks <= MAX_MODEL_BLOCKS:  # the index is unsigned: a bogus size must not cost a reader
            models.append(model)
    return sorted(models, key=lambda model: model.prefix)

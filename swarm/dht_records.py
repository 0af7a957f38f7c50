"""What peers announce in the DHT and how it is keyed.

Key `{model_prefix}.{block}`, subkey the peer's signed identity (see `identity`), value a ServerRecord as a plain dict (msgpack-able).
Records expire by themselves, so a peer that dies silently disappears after its expiration.
"""

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from swarm.identity import identity_from_subkey


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


@dataclass(frozen=True)
class ServerRecord:
    state: ServerState
    start_block: int
    end_block: int
    address: str  # host:port of the peer's gRPC data plane
    dtype: str
    version: str
    throughput: float = 0.0  # tokens/s the peer can process through its span
    cache_tokens_left: int = 0
    public_name: str = ""
    adapters: tuple[str, ...] = ()
    next_pings: dict[str, float] = field(default_factory=dict)

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
                throughput=float(record.get("throughput", 0.0)),
                cache_tokens_left=int(record.get("cache_tokens_left", 0)),
                public_name=str(record.get("public_name", "")),
                adapters=tuple(str(name) for name in record.get("adapters", ())),
                next_pings={str(k): float(v) for k, v in dict(record.get("next_pings", {})).items()},
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


def fetch_peer_spans(dht, model_prefix: str, num_blocks: int, states=(ServerState.ONLINE,)) -> list[PeerSpan]:
    """Every peer announcing blocks of the model in one of `states`, read from the DHT (one lookup per block)."""
    futures = [dht.get(block_key(model_prefix, block), latest=True, return_future=True) for block in range(num_blocks)]
    spans: dict[str, PeerSpan] = {}
    for future in futures:
        entry = future.result()
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            peer_id = identity_from_subkey(subkey)  # unsigned records, or ones claiming another's identity: ignored
            record = ServerRecord.from_dict(item.value)
            if peer_id is not None and record is not None and record.state in states and 0 <= record.start_block < record.end_block <= num_blocks:
                spans[str(peer_id)] = PeerSpan(str(peer_id), record)
    return sorted(spans.values(), key=lambda span: (span.start, span.peer_id))

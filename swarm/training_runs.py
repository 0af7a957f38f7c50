"""Collaborative training runs as the DHT shows them: which runs exist, and how far each has come.

A member of a run keeps an entry under TRAINING_RUNS_KEY (subkey: the run name) saying what the run trains, so that
`status` and the dashboard can list runs, and so that a client whose trainable parameters differ is told so before it
joins. Progress is what hivemind's ProgressTracker keeps under `{run}_progress`: one signed entry per member with its
epoch, samples accumulated towards the target and samples per second.
"""

import hashlib
from dataclasses import dataclass

import hivemind
import torch
from hivemind.utils import get_dht_time

from swarm.constants import TRAINING_RUNS_KEY

RUN_RECORD_TTL = 60.0  # seconds a run's entry lives unless a member renews it
MAX_LISTED_RUNS = 100  # the list is unsigned: a flood of entries must not cost a reader


@dataclass(frozen=True)
class RunRecord:
    name: str
    model: str  # the model's DHT prefix
    target_batch_size: int
    parameters: int  # how many numbers the run trains
    schema: str  # digest of the trained tensors' names, shapes and dtypes

    def to_dict(self) -> dict:
        return {"model": self.model, "target_batch_size": self.target_batch_size, "parameters": self.parameters,
                "schema": self.schema}


@dataclass(frozen=True)
class RunProgress:
    record: RunRecord
    epoch: int  # the highest epoch a member reports
    samples_accumulated: int  # towards the target, by the members at that epoch
    num_peers: int
    samples_per_second: float  # of the whole collaboration


def parameter_schema(named: list[tuple[str, torch.Tensor]]) -> str:
    described = ";".join(f"{name}:{list(tensor.shape)}:{tensor.dtype}" for name, tensor in named)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def store_run_record(dht: hivemind.DHT, record: RunRecord, wait: bool = False) -> None:
    """Stores (or renews) the run's entry; without `wait`, in the background."""
    stored = dht.store(TRAINING_RUNS_KEY, record.to_dict(), get_dht_time() + RUN_RECORD_TTL,
                       subkey=record.name.encode(), return_future=True)
    if wait:
        stored.result()


def fetch_run_records(dht: hivemind.DHT) -> list[RunRecord]:
    entry = dht.get(TRAINING_RUNS_KEY, latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return []
    records = []
    for subkey, item in list(entry.value.items())[:MAX_LISTED_RUNS]:
        try:
            info = item.value
            records.append(RunRecord(subkey.decode(), str(info["model"]), int(info["target_batch_size"]),
                                     int(info["parameters"]), str(info["schema"])))
        except (AttributeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
            continue  # someone else's garbage
    return sorted(records, key=lambda record: record.name)


def fetch_run_progress(dht: hivemind.DHT, record: RunRecord) -> RunProgress:
    entry = dht.get(f"{record.name}_progress", latest=True)
    members = []
    if entry is not None and isinstance(entry.value, dict):
        for item in entry.value.values():
            try:
                members.append((int(item.value["epoch"]), int(item.value["samples_accumulated"]),
                                float(item.value["samples_per_second"])))
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
    epoch = max((member[0] for member in members), default=0)
    accumulated = sum(member[1] for member in members if member[0] == epoch)
    return RunProgress(record, epoch, accumulated, len(members), sum(member[2] for member in members))

"""Many clients training one set of parameters (prompts, LoRA factors, a head) over the swarm's DHT.

`CollaborativeOptimizer` is hivemind.Optimizer on a DHT node of its own that joins the swarm (the node must take
incoming connections: hivemind's clients-only averaging needs at least one member that does), with checked averaging
(client/collaboration/checks.py), a record of the run in the DHT (swarm/training_runs.py) and a progress bar. Each
member accumulates gradients of its own batches; once the members' samples reach `target_batch_size`, they average
the gradients with all-reduce (each weighted by its samples) and all take the same optimizer step: one epoch. A member
that joins late, or falls behind, downloads the parameters and optimizer state from another member first.
"""

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import hivemind
import torch
from hivemind.optim import optimizer as hivemind_optimizer
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from torch import nn
from tqdm import tqdm

from client.collaboration.checks import CheckedGradientAverager, CheckedStateAverager
from client.remote_sequential import RemoteSequential
from swarm.dht_node import swarm_dht, wait_joined
from swarm.errors import SwarmError
from swarm.net.addresses import swarm_is_local, tcp_maddr
from swarm.training_runs import (
    RunProgress,
    RunRecord,
    fetch_run_progress,
    fetch_run_records,
    parameter_schema,
    store_run_record,
)

logger = logging.getLogger(__name__)

RECORD_RENEW_PERIOD = 20.0  # seconds between renewals of the run's DHT entry
WAIT_POLL_PERIOD = 0.2  # seconds between the catch-up steps of wait_for_epoch
SPEED_READ_PERIOD = 3.0  # seconds between reads of the collaboration's speed from the DHT (progress bar)


class CollaborationError(SwarmError):
    pass


class _HoldingTracker(ProgressTracker):
    """hivemind's progress tracker, which can hold the epoch for the target batch size (see wait_for_epoch), and
    which never arranges an averaging round ahead of the epoch's end: a round arranged ahead gathers the members that
    were in matchmaking by then and leaves out one that finishes its batch later (it then steps alone, on its own
    gradients). Each round is matched once the step is due, by every member within one refresh of the others."""

    holding = False  # the step waits for the target batch size
    going_on = False  # the step is taken with the samples there are (the wait for the others is over)

    @property
    def ready_to_update_epoch(self) -> bool:
        if self.holding or self.going_on:  # not hivemind's estimate: it expects waiting members to go on adding
            # samples (and never comes due while every member only waits, each report moving it on)
            return (self.global_epoch > self.local_progress.epoch
                    or self.global_progress.samples_accumulated >= (1 if self.going_on else self.target_batch_size))
        return super().ready_to_update_epoch

    @property
    def estimated_next_update_time(self) -> float:
        return get_dht_time() if self.ready_to_update_epoch else float("inf")


class _CheckedHivemindOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with the checked state averager and the holding tracker. hivemind.Optimizer builds both
    by name, so the names point at these classes while it is built."""

    def __init__(self, **options):
        with _swapped(hivemind_optimizer, TrainingStateAverager=CheckedStateAverager, ProgressTracker=_HoldingTracker):
            super().__init__(**options)


@contextlib.contextmanager
def _swapped(module, **replacements) -> Iterator[None]:
    originals = {name: getattr(module, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


@dataclass(frozen=True)
class CollaborationProgress:
    epoch: int  # this member's: how many optimizer steps the collaboration has taken
    samples_accumulated: int  # towards the next step, by all members
    target_batch_size: int
    num_peers: int
    samples_per_second: float  # of the whole collaboration


class CollaborativeOptimizer:
    """Use as an optimizer: `loss.backward(); opt.step(); opt.zero_grad()`; each `step` adds one local batch of
    `batch_size_per_step` samples (or `batch_size=`) towards the collaboration's target batch size.

    `params`: a model (its parameters with requires_grad; for a swarm model, also its initial peers) or the
    parameters themselves. `optimizer`: builds the torch optimizer from a list of parameters, e.g.
    `lambda params: torch.optim.AdamW(params, lr=1e-3)`; every member must use the same one. `host` / `announce_host`:
    where this member's DHT node listens and what it announces (default: loopback for a swarm on this machine, else
    all interfaces); the other members must reach it. `matchmaking_time`: seconds the members have to find each other
    for each averaging round, once the step is due; it must exceed how far apart they notice that (a refresh of the
    DHT, up to a second on a loaded machine), and each epoch costs about that long. `hivemind_options` go to
    hivemind.Optimizer as they are. `group_size`: when the number of members is known, a round begins as soon as that
    many have joined it instead of after `matchmaking_time` (more members than this would average in separate groups).
    `next_chunk_timeout`: seconds a member of a round waits for another's next part before leaving it out (default a
    quarter of `averaging_timeout`; hivemind's, `matchmaking_time`, left out live members of a loaded machine, which
    then kept their own gradients for that part: their parameters parted from the others').
    """

    def __init__(
        self,
        params: nn.Module | Iterable[nn.Parameter],
        *,
        run_id: str,
        target_batch_size: int,
        batch_size_per_step: int,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        initial_peers: list[str] | None = None,
        host: str | None = None,
        announce_host: str | None = None,
        matchmaking_time: float = 5.0,
        averaging_timeout: float = 60.0,
        next_chunk_timeout: float | None = None,
        group_size: int | None = None,
        progress_bar: bool = False,
        **hivemind_options,
    ):
        named = self._trainable(params)
        if not named:
            raise CollaborationError("nothing to train: no parameter has requires_grad (give the model a tuning_mode)")
        if not run_id or not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise CollaborationError(f"run_id must be letters, digits, '-', '_' or '.', not {run_id!r}")
        if not 0 < batch_size_per_step <= target_batch_size:
            raise CollaborationError(f"batch_size_per_step must be in 1..target_batch_size ({target_batch_size}), "
                                     f"not {batch_size_per_step}")
        initial_peers = list(initial_peers if initial_peers is not None else self._initial_peers_of(params))
        self.parameters = [parameter for _, parameter in named]
        self.record = RunRecord(run_id, self._model_prefix_of(params), target_batch_size,
                                sum(parameter.numel() for parameter in self.parameters), parameter_schema(named))
        self.batch_size_per_step = batch_size_per_step
        host = host or ("127.0.0.1" if swarm_is_local(initial_peers) or not initial_peers else "0.0.0.0")
        key = RSAPrivateKey()
        remote = self._remote_of(params)
        with remote.view.no_background_calls() if remote is not None else contextlib.nullcontext():
            self.dht, _ = swarm_dht(
                key, initial_peers=initial_peers, start=True, await_joined=False, host_maddrs=[tcp_maddr(host, 0)],
                announce_maddrs=[tcp_maddr(announce_host, 0)] if announce_host else None,
            )
        wait_joined(self.dht)
        try:
            self._check_run_matches()
            self._optimizer = _CheckedHivemindOptimizer(
                dht=self.dht, run_id=run_id, target_batch_size=target_batch_size,
                batch_size_per_step=batch_size_per_step, optimizer=optimizer, params=self.parameters,
                matchmaking_time=matchmaking_time, averaging_timeout=averaging_timeout,
                next_chunk_timeout=averaging_timeout / 4 if next_chunk_timeout is None else next_chunk_timeout,
                grad_averager_factory=functools.partial(CheckedGradientAverager, target_group_size=group_size),
                averager_opts={"target_group_size": group_size, **hivemind_options.pop("averager_opts", {})},
                tracker_opts={"private_key": key, "max_refresh_period": max(matchmaking_time / 2, 0.5),
                              **hivemind_options.pop("tracker_opts", {})},
                **hivemind_options,
            )
        except BaseException:
            self.dht.shutdown()
            raise
        store_run_record(self.dht, self.record, wait=True)  # so that a member joining next finds it
        self._renewed_at, self._speed_read_at, self._speed = time.monotonic(), 0.0, 0.0
        self._bar = tqdm(total=target_batch_size, desc=f"{run_id} epoch 0", unit="sample") if progress_bar else None

    @staticmethod
    def _trainable(params: nn.Module | Iterable[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        if isinstance(params, nn.Module):
            return [(name, parameter) for name, parameter in params.named_parameters() if parameter.requires_grad]
        return [(str(index), parameter) for index, parameter in enumerate(params)]

    @staticmethod
    def _remote_of(params) -> RemoteSequential | None:
        """The swarm blocks of a swarm model (or of a classifier's backbone), None for plain parameters."""
        return getattr(getattr(params, "backbone", params), "remote", None)

    def _initial_peers_of(self, params) -> list[str]:
        remote = self._remote_of(params)
        if remote is None:
            raise CollaborationError("give initial_peers: the multiaddr of a DHT node of the swarm")
        return list(remote.config.initial_peers)

    def _model_prefix_of(self, params) -> str:
        return getattr(self._remote_of(params), "model_prefix", "")

    def _check_run_matches(self) -> None:
        for record in fetch_run_records(self.dht):
            if record.name == self.record.name and record.schema != self.record.schema:
                raise CollaborationError(
                    f"run {record.name!r} trains other parameters ({record.parameters:,} numbers of model "
                    f"{record.model or '?'}, schema {record.schema}; these are {self.record.parameters:,}, schema "
                    f"{self.record.schema}): use the same model, tuning mode and adapter shape, or another run_id"
                )

    def _renew_record(self) -> None:
        if time.monotonic() - self._renewed_at >= RECORD_RENEW_PERIOD:
            store_run_record(self.dht, self.record)
            self._renewed_at = time.monotonic()

    @property
    def local_epoch(self) -> int:
        return self._optimizer.local_epoch

    def step(self, batch_size: int | None = None) -> bool:
        """Adds the gradients now in the parameters' .grad as one local batch; takes part in the collaboration's
        optimizer step when it is due. Returns False, counting nothing, when the gradients hold NaN or infinity."""
        batch_size = self.batch_size_per_step if batch_size is None else batch_size
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if not all(parameter.grad is None or bool(torch.isfinite(parameter.grad).all()) for parameter in self.parameters):
            logger.warning("this batch's gradients hold NaN or infinity: it is left out of the collaboration")
            self.zero_grad()
            return False
        epoch = self.local_epoch
        self._optimizer.step(batch_size=batch_size)
        self._after_step(epoch)
        return True

    def wait_for_epoch(self, epoch: int, timeout: float, hold: float | None = None) -> bool:
        """Without adding samples, keeps taking part until this member has reached `epoch` (True) or `timeout` seconds
        passed (False): for a member that has given its share of a step, or has no data left for it.

        For the first `hold` seconds (default: all of `timeout`) the step waits for the target batch size: hivemind
        would otherwise expect waiting members to go on adding samples at their usual speed and end the epoch
        without the members still computing. After `hold`, the step is taken with the samples there are, without
        members that stopped contributing (dead or gone)."""
        started = time.monotonic()
        hold = timeout if hold is None else min(hold, timeout)
        tracker = self._optimizer.tracker
        try:
            tracker.holding = True
            while self.local_epoch < epoch and time.monotonic() - started < hold:
                self._catch_up_step()
            tracker.holding, tracker.going_on = False, True
            while self.local_epoch < epoch and time.monotonic() - started < timeout:
                self._catch_up_step()
        finally:
            tracker.holding = tracker.going_on = False
        return self.local_epoch >= epoch

    def _catch_up_step(self) -> None:
        before = self.local_epoch
        self._optimizer.step(batch_size=0)  # the checked gradient averager counts no samples for it
        self._after_step(before)
        if self.local_epoch == before:
            time.sleep(WAIT_POLL_PERIOD)

    def _after_step(self, epoch_before: int) -> None:
        self._renew_record()
        if self._bar is None:
            return
        if self.local_epoch != epoch_before:
            self._bar.reset()
            self._bar.set_description(f"{self.record.name} epoch {self.local_epoch}")
        progress = self.progress()
        self._bar.n = min(progress.samples_accumulated, progress.target_batch_size)
        self._bar.set_postfix(peers=progress.num_peers, samples_per_s=f"{progress.samples_per_second:.1f}", refresh=False)
        self._bar.refresh()

    def progress(self) -> CollaborationProgress:
        """The collaboration as this member last read it from the DHT (its speed re-read every few seconds)."""
        if time.monotonic() - self._speed_read_at >= SPEED_READ_PERIOD:
            self._speed = self.run_progress().samples_per_second
            self._speed_read_at = time.monotonic()
        seen = self._optimizer.tracker.global_progress
        return CollaborationProgress(self.local_epoch, seen.samples_accumulated, seen.target_batch_size,
                                     max(seen.num_peers, 1), self._speed)

    def run_progress(self) -> RunProgress:
        """The run as the DHT shows it now (members, their epochs and speeds), read afresh."""
        return fetch_run_progress(self.dht, self.record)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def load_state_from_peers(self) -> None:
        """Downloads the current parameters and optimizer state from another member (done by itself on a step when
        this member is behind)."""
        self._optimizer.load_state_from_peers()

    def state_dict(self) -> dict:
        return self._optimizer.state_dict()

    def shutdown(self) -> None:
        """Leaves the collaboration: stops the averagers and this member's DHT node."""
        if self._bar is not None:
            self._bar.close()
        with contextlib.suppress(Exception):  # leaving must not fail because another member is gone
            self._optimizer.shutdown()
        self.dht.shutdown()

    def __enter__(self) -> "CollaborativeOptimizer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


"""What a collaborating client refuses from the others: gradient or state parts of the wrong size or dtype, NaNs or
infinities, and averaging weights that are not a finite, non-negative number of samples.

hivemind averages with all-reduce: every peer reduces one part of the flat tensors from every sender and sends each
sender back the average. Two places take someone else's numbers: a reducer takes senders' parts (checked in
`CheckedTensorPartReducer`; a refused sender is banned from the round, as hivemind bans one that stops sending, so the
average is that of the others) and a sender takes reducers' averages (checked in `CheckedAllReduceRunner`; a refused
part keeps its local value, as hivemind does for a reducer that fails). A late joiner downloads the whole state from
one peer (checked in `CheckedStateDownload`; a refused state is not applied). The parameters averaged in the
background after a step are applied only to the parameters they were taken from (`CheckedStateAverager`).

hivemind builds its AllReduceRunner by name inside the averager's own process, so that process (and only it) is given
the checked runner when it starts (`CheckedAveraging.run`).
"""

import logging

import torch
from hivemind.averaging import averager as hivemind_averager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.partition import TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

logger = logging.getLogger(__name__)


class RefusedContribution(AllreduceException):
    """Another peer's part of an averaging round that this peer will not use."""


def tensor_refusal(tensor: torch.Tensor, shape: torch.Size, dtype: torch.dtype | None = None) -> str | None:
    """Why `tensor` cannot stand for a local tensor of that shape (and dtype), or None if it can."""
    if tensor.shape != shape:
        return f"shape {list(tensor.shape)} where {list(shape)} was expected"
    if dtype is not None and tensor.dtype != dtype:
        return f"dtype {tensor.dtype} where {dtype} was expected"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return "NaN or infinite values"
    return None


def weight_refusal(weight: float) -> str | None:
    if not (weight >= 0.0 and weight != float("inf")):  # also refuses NaN, for which every comparison is False
        return f"averaging weight {weight} (must be a finite number of samples >= 0)"
    return None


class CheckedTensorPartReducer(TensorPartReducer):
    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0):
        # refused before hivemind counts the part as received, so that the ban excludes the sender from this part on
        if not 0 <= part_index < self.num_parts:
            problem = f"part #{part_index} of {self.num_parts}"
        else:
            problem = tensor_refusal(tensor_part, self.part_shapes[part_index]) or weight_refusal(weight)
        if problem is not None:
            logger.warning(f"refused sender #{sender_index}'s part #{part_index} of this averaging round: {problem}")
            raise RefusedContribution(problem)
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight)


class CheckedAllReduceRunner(AllReduceRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reducer = self.tensor_part_reducer
        reducer.finished.set()  # replaced before use: not "finished having received 0% of its parts" when collected
        self.tensor_part_reducer = CheckedTensorPartReducer(reducer.part_shapes, reducer.num_senders)
        container = self.tensor_part_container
        register = container.register_processed_part

        def register_checked(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise RefusedContribution(f"peer #{peer_index} averaged part #{part_index} to NaN or infinite values")
            register(peer_index, part_index, part)

        container.register_processed_part = register_checked  # a failing part then keeps its local value


class CheckedAveraging:
    """Mixed in before a hivemind averager: its process runs checked all-reduce rounds."""

    def run(self) -> None:
        hivemind_averager.AllReduceRunner = CheckedAllReduceRunner  # this is the averager's own child process
        super().run()


class CheckedStateDownload(DecentralizedAverager):
    """Placed below an averager whose `load_state_from_peers` builds on the downloaded tensors (in its MRO, before
    DecentralizedAverager): a state that does not match the local one tensor for tensor (count, shape, dtype, all
    finite) is not applied."""

    def load_state_from_peers(self, *args, **kwargs):
        loaded = super().load_state_from_peers(*args, **kwargs)
        if loaded is None:
            return None
        metadata, tensors = loaded
        problem = _state_refusal(list(tensors), list(self.get_current_state()[1]))
        if problem is not None:
            logger.warning(f"refused the state downloaded from a peer: {problem}")
            return None
        return metadata, tensors


def _state_refusal(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> str | None:
    if len(theirs) != len(ours):
        return f"{len(theirs)} tensors where {len(ours)} were expected"
    for index, (their, our) in enumerate(zip(theirs, ours)):
        problem = tensor_refusal(their, our.shape, our.dtype)
        if problem is not None:
            return f"tensor #{index}: {problem}"
    return None


class CheckedGradientAverager(CheckedAveraging, CheckedStateDownload, GradientAverager):
    def accumulate_grads_(self, batch_size: int) -> None:
        if batch_size == 0:  # a step that only keeps up with the collaboration (CollaborativeOptimizer.wait_for_epoch)
            return
        super().accumulate_grads_(batch_size)


class CheckedStateAverager(CheckedAveraging, TrainingStateAverager, CheckedStateDownload):
    """Parameters and optimizer statistics, averaged and downloaded with checks.

    hivemind averages the parameters of epoch E in the background and copies the average into the parameters at a
    later step call. When that round ends after this member's next optimizer step (a slow round, a loaded machine),
    hivemind's copy would undo that step; when the group mixed members of different epochs, the average is of
    different parameters. Either way the members would no longer hold the parameters of one run: such an average (or
    a failed round's buffers) is dropped. Averages of one epoch's identical parameters change nothing but rounding."""

    _round: StepControl | None = None  # the latest background round, whose gathered data is each member's epoch

    def _do(self, wait_for_trigger, optimizer_step, zero_grad, averaging_round, averaging_control, *args,
            timeout=None, **kwargs):
        if averaging_round:
            if averaging_control is None or averaging_control.triggered or averaging_control.done():
                # as hivemind's _do would, but kept: its result tells the members' epochs (see _apply_averaging_results_)
                averaging_control = DecentralizedAverager.step(
                    self, gather=self.local_epoch, require_trigger=True, timeout=timeout, wait=False, **kwargs)
            self._round = averaging_control
        return super()._do(wait_for_trigger, optimizer_step, zero_grad, averaging_round, averaging_control, *args,
                           timeout=timeout, **kwargs)

    def _apply_averaging_results_(self) -> None:
        try:
            epochs = set(self._round.result(timeout=0).values()) if self._round is not None else set()
        except BaseException:  # the round failed: its buffers hold no average
            epochs = set()
        if epochs != {self.local_epoch}:
            logger.info(f"dropped a parameter average of epochs {sorted(epochs)} at epoch {self.local_epoch}")
            return
        super()._apply_averaging_results_()

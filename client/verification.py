"""Checking peers' answers: anyone can join a swarm, so an answer is not trusted just because it arrived.

A peer's answer is recomputed from the same inputs by other peers serving the same blocks (a replica, or a chain
of them: a "second opinion"); the peer that is checked takes no part and cannot tell. If the two disagree, a third
opinion, from peers that took part in neither, decides: the outvoted peer is convicted (avoided for long, see
`SwarmView.convict`) and the caller goes on with the answer of the majority. An inference session keeps, for each
hop, what that hop's cache holds and what the peer answered (`HopTimeline`), so that its whole history is checked
as one stateless forward pass (the cost of a prefill) rather than step by step.

What this does not cover: a majority of colluding peers for the same blocks, and a peer that only reads what it is
sent (that is the encrypted data plane's business).
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from swarm.errors import MissingBlocksError, SwarmError

logger = logging.getLogger(__name__)

# How far (relative to the reference's size, per token) an honest answer may drift: different threads, kernels
# and batch shapes round differently, more so in the half-precision dtypes and through a lossy wire codec.
DTYPE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
CODEC_TOLERANCE = {"": 0.0, "none": 0.0, "float16": 2e-3, "bfloat16": 1e-2, "int8": 5e-2}

Answer = TypeVar("Answer")


class VerificationError(SwarmError):
    """Peers disagree and no majority can be found among those that serve the blocks."""


class WrongAnswerCaught(SwarmError):
    """A hop of an inference session answered wrong; its peer was convicted and replaced. What was computed since
    `position` (the first token whose answer was wrong) must be computed again: `generate` does so by itself."""

    def __init__(self, peer: str, start: int, end: int, position: int, steps_got_away: int):
        self.peer, self.start, self.end, self.position = peer, start, end, position
        self.steps_got_away = steps_got_away
        super().__init__(
            f"peer {peer} answered wrong for blocks {start}:{end} from token {position} on ({steps_got_away} "
            "steps); it was replaced, and what it touched must be computed again"
        )


@dataclass
class Conviction:
    peer: str
    start: int
    end: int
    steps_got_away: int  # steps answered wrong before the check that caught the peer


@dataclass
class VerificationReport:
    """What was checked in a generation (`generate`'s result carries one as `.verification`)."""

    checks: int = 0  # second opinions asked for
    unchecked_blocks: list[tuple[int, int]] = field(default_factory=list)  # no other peer serves them
    # blocks whose peer, trusted after its probation, was not drawn for a spot check this time
    spot_skipped: list[tuple[int, int]] = field(default_factory=list)
    caught: list[Conviction] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        """Every answer was recomputed by other peers and agreed (after the liars caught were replaced)."""
        return self.checks > 0 and not self.unchecked_blocks and not self.spot_skipped


def tolerance(dtypes: Iterable[torch.dtype], codec: str) -> float:
    return max(DTYPE_TOLERANCE.get(dtype, DTYPE_TOLERANCE[torch.bfloat16]) for dtype in dtypes) + CODEC_TOLERANCE.get(codec, 0.1)


def token_errors(answer: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token relative error [batch, tokens] of `answer` against `reference` ([batch, tokens, hidden]); padding
    (mask 0) counts as agreeing, since nothing reads it; NaN and a wrong shape count as infinitely wrong."""
    if answer.shape != reference.shape:
        return torch.full(reference.shape[:2], float("inf"))
    answer, reference = answer.float(), reference.float()
    norms = reference.norm(dim=-1)
    scale = norms.clamp_min(1e-3 * max(norms.mean().item(), 1e-12))  # a near-zero token is held to its neighbours' size
    errors = torch.nan_to_num((answer - reference).norm(dim=-1) / scale, nan=float("inf"))
    if mask is not None:
        errors = errors.masked_fill(~mask.bool(), 0.0)
    return errors


def tensors_agree(answer, reference, limit: float, mask: torch.Tensor | None = None) -> bool:
    """Whether two answers agree: hidden states token by token; a tuple of tensors (gradients; None where there is
    none) each as a whole, since a gradient may be near zero at some positions."""
    if isinstance(reference, tuple):
        return len(answer) == len(reference) and all(
            (a is None) == (r is None) and (r is None or _agree_whole(a, r, limit)) for a, r in zip(answer, reference)
        )
    return bool((token_errors(answer, reference, mask) <= limit).all())


def _agree_whole(answer: torch.Tensor, reference: torch.Tensor, limit: float) -> bool:
    return answer.shape == reference.shape and tensors_agree(answer.reshape(1, 1, -1), reference.reshape(1, 1, -1), limit)


@dataclass
class Opinion:
    answer: object
    peers: frozenset[str]


class Referee:
    """Gets second and third opinions for an answer of one peer and convicts whoever is outvoted."""

    def __init__(self, view):
        self.view = view

    def settle(
        self,
        suspect: str,
        answer: Answer,
        recompute: Callable[[frozenset[str]], Opinion],
        agree: Callable[[object, object], bool],
        blocks: tuple[int, int],
        report: VerificationReport,
    ) -> Answer | None:
        """The answer to go on with: `answer` if other peers agree with it, else theirs (and `suspect` is
        convicted). None when no other peer serves the blocks (noted in `report`). `recompute(exclude)` computes
        the same thing on peers outside `exclude` and says which it used."""
        second = self._opinion(recompute, frozenset({suspect}))
        if second is None:
            if blocks not in report.unchecked_blocks:
                report.unchecked_blocks.append(blocks)
                logger.warning(f"no peer but {suspect} serves blocks {blocks[0]}:{blocks[1]}: its answers are unchecked")
            return None
        report.checks += 1
        if agree(answer, second.answer):
            self.view.passed_check(suspect)
            return answer
        third = self._opinion(recompute, frozenset({suspect}) | second.peers)
        if third is None:
            raise VerificationError(
                f"peer {suspect} and peers {sorted(second.peers)} disagree on blocks {blocks[0]}:{blocks[1]} and no "
                "other peer serves them to decide: the output cannot be trusted"
            )
        report.checks += 1
        if agree(third.answer, second.answer):
            self.view.convict(suspect, f"blocks {blocks[0]}:{blocks[1]}: outvoted by {sorted(second.peers | third.peers)}")
            return second.answer
        if agree(third.answer, answer):
            self.view.passed_check(suspect)
            if len(second.peers) == 1:  # its answer was a check, not used: it got away with nothing
                (peer,) = second.peers
                self.view.convict(peer, f"blocks {blocks[0]}:{blocks[1]}: outvoted by {suspect} and {sorted(third.peers)}")
                report.caught.append(Conviction(peer, *blocks, steps_got_away=0))
            else:  # one peer of the chain answered wrong, which one the chain's answer does not tell: none is convicted
                logger.warning(f"the check of blocks {blocks[0]}:{blocks[1]} by {sorted(second.peers)} was outvoted; "
                               "one of them answered wrong, not known which, so none is convicted")
            return answer
        raise VerificationError(f"three different answers for blocks {blocks[0]}:{blocks[1]}: the output cannot be trusted")

    @staticmethod
    def _opinion(recompute: Callable[[frozenset[str]], Opinion], exclude: frozenset[str]) -> Opinion | None:
        """None when no other peer serves the blocks, or those that do failed (already banned by the call)."""
        try:
            return recompute(exclude)
        except MissingBlocksError:
            return None
        except SwarmError as error:
            logger.warning(f"a second opinion failed ({error}); the answer stays unchecked this time")
            return None


class HopTimeline:
    """What one hop's peer holds in its cache for a session, token by token, with what it answered for each token:
    inputs, outputs, positions and mask [batch, tokens, ...], in the cache's order (reorders applied, rolled-back
    tokens cut), so that one stateless forward over the inputs must give the outputs."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []  # one entry per step: its tokens
        self.verified_tokens = 0  # the first tokens, whose answers other peers confirmed

    @property
    def tokens(self) -> int:
        return sum(step["inputs"].shape[1] for step in self.steps)

    def record(
        self, inputs: torch.Tensor, outputs: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
        start_position: int | None = None, reorder: torch.Tensor | None = None,
    ) -> None:
        """One step, as the peer applies it: roll back to `start_position`, reorder the rows, then the new tokens."""
        if start_position is not None:
            self.cut(start_position)
        if reorder is not None:
            self.steps = [{name: tensor[reorder] for name, tensor in step.items()} for step in self.steps]
        self.steps.append({"inputs": inputs, "outputs": outputs, "position_ids": position_ids, "mask": mask})

    def cut(self, tokens: int) -> None:
        """Forget everything from token `tokens` on (a rollback)."""
        kept, count = [], 0
        for step in self.steps:
            length = step["inputs"].shape[1]
            if count + length > tokens:
                if tokens > count:
                    kept.append({name: tensor[:, : tokens - count] for name, tensor in step.items()})
                break
            kept.append(step)
            count += length
        self.steps = kept
        self.verified_tokens = min(self.verified_tokens, tokens)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat([step[name] for step in self.steps], dim=1) for name in self.steps[0]}

    def step_of(self, token: int) -> int:
        """The index of the step that holds token `token`."""
        count = 0
        for index, step in enumerate(self.steps):
            count += step["inputs"].shape[1]
            if token < count:
                return index
        return len(self.steps)

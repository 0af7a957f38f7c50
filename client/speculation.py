"""Draft lengths for speculative decoding chosen from what the chain costs, step by step.

transformers drafts a fixed number of tokens with prompt lookup and, with an assistant model, follows a schedule
that reacts to acceptance only (two more after a fully accepted draft, one fewer otherwise). Through a swarm the
best length also depends on the round trip: every verification step pays the chain's latency once, however many
tokens it carries. `AdaptiveDraftLength` wraps transformers' candidate generator and, before each draft, picks the
length K that maximises the expected tokens per second of one step:

    expected tokens 1 + sum over k <= K of (a_1 x ... x a_k)  /  (step base + (K + 1) x per-token step cost
                                                                  + K x draft cost)

with a_i the observed probability that the i-th draft token is accepted once those before it were (per position:
prompt lookup's drafts, say, are often right for a few tokens and then never; a position seen little leans on the
rate of all positions together), the step's base (the round trip, mostly) and per-token cost fitted to the
verification steps timed so far (the first carries the whole prompt, so the fit has two very different sizes from
the start), and the draft's cost per token timed too.

The choice depends on timings, so under sampling it changes how much randomness a run draws: a seed then no longer
repeats the same tokens. It is therefore used by default for greedy decoding only (DistributedCausalLMMixin).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_ASSISTANT_TOKENS = 32  # the longest draft asked of an assistant model (prompt lookup: its configured length)
STEP_HISTORY = 32  # verification steps kept for the fit of step time against tokens
ACCEPTANCE_MEMORY = 0.9  # weight of a draft position's counts so far at each new try of it
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.5, 2.0  # before any step: as if 2 tokens were tried, half accepted
DRAFT_COST_WEIGHT = 0.3  # moving-average weight of a new draft's seconds per token


def expected_tokens(acceptance: Sequence[float], drafted: int) -> float:
    """Tokens one verification step yields with `drafted` draft tokens, the i-th accepted with probability
    `acceptance[i]` once those before it were: the accepted run, plus the model's own token after it."""
    total = run = 1.0
    for rate in acceptance[:drafted]:
        run *= rate
        total += run
    return total


def best_draft_length(acceptance: Sequence[float], step_base: float, step_per_token: float, draft_per_token: float,
                      longest: int) -> int:
    """The draft length in 1..longest with the most expected tokens per second of a step (the shortest on a tie);
    `acceptance` per position, at least `longest` of them."""
    def rate(drafted: int) -> float:
        seconds = step_base + step_per_token * (drafted + 1) + draft_per_token * drafted
        return expected_tokens(acceptance, drafted) / max(seconds, 1e-9)

    return max(range(1, max(longest, 1) + 1), key=rate)


class PositionAcceptance:
    """Per draft position i, how often its token was accepted when it was tried (drafted, and every token before
    it accepted), as counts decayed at each try so that recent tries count most. A position tried little leans on
    the pooled rate of all positions (which is what a draft whose tokens are alike would have at every position)."""

    def __init__(self):
        self.tried: list[float] = []
        self.kept: list[float] = []

    def add(self, drafted: int, accepted: int) -> None:
        """One step's draft: its first `accepted` tokens kept (and the one after them, if any, rejected)."""
        missing = drafted - len(self.tried)
        self.tried, self.kept = self.tried + [0.0] * missing, self.kept + [0.0] * missing
        # the positions this step tried; the others keep what they had
        for position in range(min(accepted + 1, drafted)):
            self.tried[position] = ACCEPTANCE_MEMORY * self.tried[position] + 1.0
            self.kept[position] = ACCEPTANCE_MEMORY * self.kept[position] + (position < accepted)

    @property
    def pooled(self) -> float:
        return (sum(self.kept) + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (sum(self.tried) + PRIOR_WEIGHT)

    def rates(self, positions: int) -> list[float]:
        pooled = self.pooled
        seen = [(kept + pooled * PRIOR_WEIGHT) / (tried + PRIOR_WEIGHT) for tried, kept in zip(self.tried, self.kept)]
        return (seen + [pooled] * positions)[:positions]


class StepTimeFit:
    """seconds = base + per_token x tokens, least squares over the latest verification steps. When the kept steps
    all carried the same number of tokens the slope cannot be told, and the last one found is kept."""

    def __init__(self):
        self.samples: deque[tuple[int, float]] = deque(maxlen=STEP_HISTORY)
        self.per_token = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def fit(self) -> tuple[float, float]:
        """(base, per_token) in seconds; (0, 0) before any step."""
        if not self.samples:
            return 0.0, 0.0
        tokens = [float(count) for count, _ in self.samples]
        seconds = [duration for _, duration in self.samples]
        mean_tokens, mean_seconds = statistics.fmean(tokens), statistics.fmean(seconds)
        spread = sum((count - mean_tokens) ** 2 for count in tokens)
        if spread > 0:
            covariance = sum((count - mean_tokens) * (duration - mean_seconds) for count, duration in zip(tokens, seconds))
            self.per_token = max(covariance / spread, 0.0)
        return max(mean_seconds - self.per_token * mean_tokens, 0.0), self.per_token


@dataclass
class SpeculationReport:
    """What the drafts of one generate call were: per verification step, the length asked for, the tokens drafted
    and those accepted."""

    asked: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.asked)


def record_drafts(generator, length_attribute: str, report: SpeculationReport) -> None:
    """Has transformers' own candidate generator note each draft in `report` (the length it was set to, the tokens it
    drafted, those the step accepted) without changing what it does. Its methods are wrapped on the instance rather
    than the generator wrapped: transformers' loop checks the generator's class after the last step (to keep an
    assistant's heuristic draft length for its next call), so it must stay what it is."""
    get_candidates, update_candidate_strategy = generator.get_candidates, generator.update_candidate_strategy

    def recorded_get_candidates(input_ids: torch.LongTensor, *args, **kwargs):
        report.asked.append(int(getattr(generator, length_attribute)))
        candidates, logits = get_candidates(input_ids, *args, **kwargs)
        report.drafted.append(candidates.shape[1] - input_ids.shape[1])
        return candidates, logits

    def recorded_update(input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        report.accepted.append(min(int(num_matches), report.drafted[-1]))
        update_candidate_strategy(input_ids, scores, num_matches)

    generator.get_candidates, generator.update_candidate_strategy = recorded_get_candidates, recorded_update


class AdaptiveDraftLength:
    """Stands in for one of transformers' candidate generators (prompt lookup or an assistant model) in its assisted
    decoding loop, setting the inner generator's draft length before each draft (see the module docstring). The
    inner generator records its drafts in `report` (record_drafts), which this reads back.
    `cached_tokens()` tells how many of the sequence's tokens the chain holds (a step sends the rest)."""

    def __init__(self, inner, length_attribute: str, longest: int, cached_tokens, report: SpeculationReport):
        self.inner, self.length_attribute, self.longest = inner, length_attribute, max(int(longest), 1)
        self.cached_tokens, self.report = cached_tokens, report
        self.step_times = StepTimeFit()
        self.acceptance = PositionAcceptance()
        self.draft_per_token: float | None = None
        self._step_tokens = 0
        self._step_started = 0.0

    # what transformers' loop reads of a candidate generator besides the two methods
    @property
    def requires_model_outputs(self) -> bool:
        return getattr(self.inner, "requires_model_outputs", False)

    @property
    def model_kwargs_overrides(self) -> dict:
        return self.inner.model_kwargs_overrides

    def next_length(self) -> int:
        if not self.step_times.samples:  # nothing timed yet: the length the caller configured
            return min(int(getattr(self.inner, self.length_attribute)), self.longest)
        base, per_token = self.step_times.fit()
        return best_draft_length(self.acceptance.rates(self.longest), base, per_token, self.draft_per_token or 0.0,
                                 self.longest)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        setattr(self.inner, self.length_attribute, self.next_length())
        started = time.perf_counter()
        candidates, logits = self.inner.get_candidates(input_ids, **kwargs)
        self._step_started = time.perf_counter()
        self._step_tokens = candidates.shape[1] - self.cached_tokens()
        drafted = self.report.drafted[-1]
        if drafted > 0:
            per_token = (self._step_started - started) / drafted
            previous = per_token if self.draft_per_token is None else self.draft_per_token
            self.draft_per_token = previous + DRAFT_COST_WEIGHT * (per_token - previous)
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.step_times.add(self._step_tokens, time.perf_counter() - self._step_started)
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)  # its length is replaced before the next draft
        if self.report.drafted[-1] > 0:  # a step with no draft says nothing of acceptance
            self.acceptance.add(self.report.drafted[-1], self.report.accepted[-1])

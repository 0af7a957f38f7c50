"""The draft-length choice of client/speculation.py on its own: the cost model, the fit of step times, and the
adaptive generator driven by a simulated chain on a fake clock (so that the lengths it settles on are exact)."""

import types

import pytest
import torch

from client import speculation
from client.speculation import AdaptiveDraftLength, SpeculationReport, StepTimeFit, best_draft_length, expected_tokens


def test_expected_tokens_per_step():
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 7) == 8.0
    assert expected_tokens(0.0, 5) == 1.0


def test_long_round_trips_ask_for_long_drafts():
    common = {"acceptance": 0.7, "step_per_token": 0.0002, "draft_per_token": 0.001, "longest": 32}
    lengths = [best_draft_length(step_base=base, **common) for base in (0.0005, 0.005, 0.05, 0.5)]
    assert lengths == sorted(lengths) and lengths[0] <= 2 and lengths[-1] >= 10
    assert best_draft_length(0.99, 0.5, 0.0, 0.0, longest=8) == 8  # free drafts, sure acceptance: the longest
    assert best_draft_length(0.05, 0.5, 0.001, 0.01, longest=8) == 1  # drafts that are almost never right


def test_step_time_fit_recovers_base_and_slope():
    fit = StepTimeFit()
    assert fit.fit() == (0.0, 0.0)
    for tokens in (40, 3, 5, 3, 9):
        fit.add(tokens, 0.020 + 0.001 * tokens)
    base, per_token = fit.fit()
    assert base == pytest.approx(0.020) and per_token == pytest.approx(0.001)
    same = StepTimeFit()
    same.per_token = 0.002  # found earlier
    for _ in range(3):
        same.add(4, 0.030)
    assert same.fit() == pytest.approx((0.022, 0.002))  # no spread: the slope found before stays


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeDrafts:
    """Like prompt lookup: drafts `num_output_tokens` tokens, `draft_seconds` each on the fake clock."""

    def __init__(self, clock: FakeClock, draft_seconds: float):
        self.clock, self.draft_seconds, self.num_output_tokens = clock, draft_seconds, 16

    def get_candidates(self, input_ids):
        self.clock.now += self.draft_seconds * self.num_output_tokens
        return torch.cat([input_ids, torch.zeros(1, self.num_output_tokens, dtype=input_ids.dtype)], dim=1), None

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        pass


def settled_length(monkeypatch, round_trip: float) -> int:
    """Runs 30 steps through a simulated chain costing round_trip + 0.2 ms a token, where each draft token is
    accepted as long as the three before it were (at most 3 a step); returns the length asked for last."""
    clock = FakeClock()
    monkeypatch.setattr(speculation, "time", types.SimpleNamespace(perf_counter=clock))
    cached = [0]
    drafts = AdaptiveDraftLength(FakeDrafts(clock, 0.0005), "num_output_tokens", 16, lambda: cached[0],
                                 SpeculationReport())
    sequence = torch.zeros(1, 20, dtype=torch.long)
    for _ in range(30):
        candidates, _ = drafts.get_candidates(sequence)
        drafted = candidates.shape[1] - sequence.shape[1]
        clock.now += round_trip + 0.0002 * (candidates.shape[1] - cached[0])
        accepted = min(drafted, 3)
        sequence = candidates[:, : sequence.shape[1] + accepted + 1]
        cached[0] = sequence.shape[1] - 1
        drafts.update_candidate_strategy(sequence, None, accepted)
    assert drafts.report.steps == 30 and drafts.report.accepted[-1] == min(drafts.report.drafted[-1], 3)
    return drafts.report.asked[-1]


def test_the_draft_length_follows_the_chain(monkeypatch):
    near, far = settled_length(monkeypatch, 0.001), settled_length(monkeypatch, 0.2)
    assert near <= 3 < far, (near, far)

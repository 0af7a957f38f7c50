"""The draft-length choice of client/speculation.py on its own: the cost model, the fit of step times, and the
adaptive generator driven by a simulated chain on a fake clock (so that the lengths it settles on are exact)."""

import random
import types

import pytest
import torch

from client import speculation
from client.speculation import (
    AdaptiveDraftLength,
    PositionAcceptance,
    SpeculationReport,
    StepTimeFit,
    best_draft_length,
    expected_tokens,
    record_drafts,
)


def test_expected_tokens_per_step():
    assert expected_tokens([0.5] * 4, 1) == pytest.approx(1.5)
    assert expected_tokens([0.5] * 4, 2) == pytest.approx(1.75)
    assert expected_tokens([1.0] * 8, 7) == 8.0
    assert expected_tokens([0.0] * 5, 5) == 1.0
    assert expected_tokens([1.0, 1.0, 0.0, 1.0], 4) == 3.0  # nothing past a token never accepted


def test_long_round_trips_ask_for_long_drafts():
    common = {"acceptance": [0.7] * 32, "step_per_token": 0.0002, "draft_per_token": 0.001, "longest": 32}
    lengths = [best_draft_length(step_base=base, **common) for base in (0.0005, 0.005, 0.05, 0.5)]
    assert lengths == sorted(lengths) and lengths[0] <= 2 and lengths[-1] >= 10
    assert best_draft_length([0.99] * 8, 0.5, 0.0, 0.0, longest=8) == 8  # free drafts, sure acceptance: the longest
    assert best_draft_length([0.05] * 8, 0.5, 0.001, 0.01, longest=8) == 1  # drafts that are almost never right
    assert best_draft_length([1.0] * 3 + [0.0] * 5, 0.5, 0.0001, 0.001, longest=8) == 3  # right for 3, then never


def test_acceptance_per_position_leans_on_the_pooled_rate_where_little_was_seen():
    acceptance = PositionAcceptance()
    assert acceptance.rates(3) == [0.5, 0.5, 0.5]  # the prior
    for _ in range(30):
        acceptance.add(drafted=6, accepted=2)  # two right, the third wrong, the rest never tried
    first, second, third, fourth = acceptance.rates(4)
    assert first > 0.9 and second > 0.9 and third < 0.15
    assert fourth == pytest.approx(acceptance.pooled) and 0.6 < fourth < 0.7  # (2 of 3 tried, with the prior)


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


def settled_length(monkeypatch, round_trip: float, accepted_of) -> int:
    """Runs 40 steps through a simulated chain costing round_trip + 0.2 ms a token, where `accepted_of(drafted)` of
    each draft are accepted; returns the median length asked for in the last 10."""
    clock = FakeClock()
    monkeypatch.setattr(speculation, "time", types.SimpleNamespace(perf_counter=clock))
    cached, report, inner, kept = [0], SpeculationReport(), FakeDrafts(clock, 0.0005), []
    record_drafts(inner, "num_output_tokens", report)
    drafts = AdaptiveDraftLength(inner, "num_output_tokens", 16, lambda: cached[0], report)
    sequence = torch.zeros(1, 20, dtype=torch.long)
    for _ in range(40):
        candidates, _ = drafts.get_candidates(sequence)
        drafted = candidates.shape[1] - sequence.shape[1]
        clock.now += round_trip + 0.0002 * (candidates.shape[1] - cached[0])
        accepted = accepted_of(drafted)
        kept.append(accepted)
        sequence = candidates[:, : sequence.shape[1] + accepted + 1]
        cached[0] = sequence.shape[1] - 1
        drafts.update_candidate_strategy(sequence, None, accepted)
    assert report.steps == 40 and report.accepted == kept
    return sorted(report.asked[-10:])[5]


def test_the_draft_length_follows_the_chain(monkeypatch):
    coin = random.Random(5)

    def geometric(drafted: int) -> int:  # each token right with probability 0.8 once those before it were
        return next((index for index in range(drafted) if coin.random() >= 0.8), drafted)

    near, far = settled_length(monkeypatch, 0.001, geometric), settled_length(monkeypatch, 0.2, geometric)
    assert near <= 3 < far, (near, far)


def test_the_draft_length_stops_where_drafts_stop_being_right(monkeypatch):
    """Drafts right for their first 3 tokens and never after (as prompt lookup's often are): nothing is gained past
    3, which a single acceptance rate for all positions (3 of 4 tried) would not see at a 20 ms round trip."""
    for round_trip in (0.001, 0.02):
        assert settled_length(monkeypatch, round_trip, lambda drafted: min(drafted, 3)) in (3, 4)

"""Peers that answer wrong cannot change the client's tokens or gradients: with default client settings, every kind
of liar (tests/liar_peer.py, and a peer serving other weights under the real model prefix) is routed to, caught,
convicted, and the results are exactly local `transformers`'."""

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client import AutoDistributedModelForCausalLM
from client.config import ClientConfig
from client.verification import (
    HopTimeline,
    Opinion,
    Referee,
    VerificationError,
    VerificationReport,
    tensors_agree,
    token_errors,
)
from peer.local_swarm import PeerHandle, spawn_cli, start_peers
from swarm.checkpoint import Checkpoint
from swarm.errors import MissingBlocksError
from swarm.routing import Hop
from tests.test_training import assert_blocks_match_local

HONEST = ["0:2", "2:4", "0:4"]  # a replica of the liar's span, and a chain of two: second and third opinions
LIARS = {
    "noise-1%": {"SWARM_TEST_LIE": "noise:0.01"},
    "noise-100%": {"SWARM_TEST_LIE": "noise:1"},
    "1-step-in-20": {"SWARM_TEST_LIE": "sometimes:20", "SWARM_TEST_LIE_SEED": "3"},
    "after-10-steps": {"SWARM_TEST_LIE": "after:10"},
    "other-weights": None,
}
PROMPT = torch.tensor([[1, 72, 105, 33, 9]])
NEW_TOKENS = 24
GOT_AWAY: dict[str, list[int]] = {}  # liar -> steps it answered wrong before it was caught, per catch


def other_weights_same_prefix(path: str, destination: Path) -> str:
    """The checkpoint with every tensor changed except its first row, which is what the fingerprint samples: the
    same model prefix (the swarm takes it for the same model), other weights."""
    shutil.copytree(path, destination)
    generator = torch.Generator().manual_seed(7)
    for file in destination.glob("*.safetensors"):
        weights = load_file(file)
        for name, tensor in weights.items():
            if tensor.ndim >= 1 and tensor.shape[0] > 1:
                tensor[1:] += 0.5 * torch.randn(tensor[1:].shape, generator=generator) * tensor.std().clamp_min(1e-3)
        save_file(weights, file, metadata={"format": "pt"})
    assert Checkpoint(str(destination)).model_prefix() == Checkpoint(path).model_prefix()
    return str(destination)


@pytest.fixture(scope="module")
def honest(tiny_llama, bootstrap):
    handles = start_peers(tiny_llama, bootstrap, HONEST)
    yield handles
    for handle in handles:
        handle.process.stop()


@pytest.fixture(scope="module", params=sorted(LIARS))
def liar(request, tiny_llama, bootstrap, honest, tmp_path_factory):
    env = LIARS[request.param]
    path = tiny_llama if env else other_weights_same_prefix(tiny_llama, tmp_path_factory.mktemp("liar") / "model")
    process = spawn_cli(
        "serve", path, "--initial-peers", bootstrap, "--blocks", "0:4", "--announce-period", "5",
        "--num-threads", "1", module="tests.liar_peer" if env else "peer.cli", env=env,
    )
    handle = PeerHandle.from_online_line(process)
    yield request.param, handle
    process.stop()


def routed_first_to(model, lying: PeerHandle) -> None:
    """Make `lying` the client's first choice of route, for inference and training alike (as if it had lied about
    its speed): until it is convicted, every call goes to it."""
    view = model.remote.view
    choose = view.chain

    def liar_first(start=0, end=None, *args, exclude=frozenset(), **kwargs):
        span = next((s for s in view.peer_spans() if s.peer_id == lying.peer_id), None)
        if exclude or span is None or view.is_banned(lying.peer_id):
            return choose(start, end, *args, exclude=exclude, **kwargs)
        return [Hop(span, start, view.num_blocks if end is None else end)]

    view.chain = liar_first


@pytest.fixture
def model(tiny_llama, bootstrap, honest, liar):
    """A client with default settings routed to the liar first."""
    _, lying = liar
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=tuple(h.peer_id for h in [*honest, lying]),
    )
    routed_first_to(model, lying)
    yield model
    model.close()


@pytest.mark.slow
def test_a_trusted_peer_that_turns_liar_is_caught_by_a_spot_check(tiny_llama, bootstrap, honest, reference):
    """A peer through its probation is checked only at random; once it lies, a call not drawn for a check says it
    was not checked (the peer was trusted), and the first spot check catches it, convicts it and fixes that call."""
    process = spawn_cli(
        "serve", tiny_llama, "--initial-peers", bootstrap, "--blocks", "0:4", "--announce-period", "5",
        "--num-threads", "1", module="tests.liar_peer", env={"SWARM_TEST_LIE": "after:40"},
    )
    lying = PeerHandle.from_online_line(process)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=tuple(h.peer_id for h in [*honest, lying]),
        verify_probation=3, spot_check_rate=0.5,
    )
    try:
        routed_first_to(model, lying)
        expected = reference.generate(PROMPT, max_new_tokens=6, do_sample=False)
        reports = []
        for _ in range(60):  # ~7 honest calls, then a spot check at each call with probability 1/2
            output = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
            reports.append(output.verification)
            if output.verification.checked:
                assert torch.equal(output, expected)
            else:
                assert output.verification.spot_skipped == [(0, 4)] and not output.verification.unchecked_blocks
            if output.verification.caught:
                break
        assert all(report.checked for report in reports[:3])  # on probation, every call is checked
        assert model.remote.view.is_convicted(lying.peer_id)
        wrong = sum(not report.checked for report in reports[7:])
        print(f"\ntrusted liar: caught at call {len(reports)}, {wrong} unchecked calls after it turned (at most)")
    finally:
        model.close()
        process.stop()


def test_a_peer_that_pushes_other_values_than_it_answers_changes_no_token(tiny_llama, bootstrap, honest, reference):
    """With peer-to-peer pushes, the next peer computes on what it was pushed, not on what the client saw: it says
    what it got (a digest), and the client, seeing the two differ, sends the step on itself from then on."""
    process = spawn_cli(
        "serve", tiny_llama, "--initial-peers", bootstrap, "--blocks", "0:2", "--announce-period", "5",
        "--num-threads", "1", module="tests.liar_peer", env={"SWARM_TEST_LIE": "push"},
    )
    pusher = PeerHandle.from_online_line(process)
    after = next(handle for handle in honest if handle.start_block == 2)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(pusher.peer_id, after.peer_id, honest[-1].peer_id),
    )
    try:
        view = model.remote.view
        for span in view.peer_spans():  # the pusher and the peer after it look fastest: the route goes through them
            view._rtts[span.peer_id] = (0.0 if span.peer_id != honest[-1].peer_id else 0.5, time.monotonic())
        expected = reference.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        with model.inference_session(max_length=64) as session:
            assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
            assert session.route[0].peer.peer_id == pusher.peer_id
        assert session.pushed_steps < NEW_TOKENS  # the pushes stopped once the digest gave them away
        assert not view.is_convicted(after.peer_id)  # it computed right on what it got: no false conviction
    finally:
        model.close()
        process.stop()


@pytest.mark.slow
def test_honest_replicas_of_other_thread_counts_and_batch_shapes_convict_nobody(tiny_llama, bootstrap, honest, reference):
    (threaded,) = start_peers(tiny_llama, bootstrap, ["0:4"], "--num-threads", "2")  # start_peers gives 1 thread
    peers = tuple(handle.peer_id for handle in [*honest, threaded])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=peers, verify_every=4, spot_check_rate=1.0,
    )
    try:
        checks = 0
        for generation in range(50):
            rows = 1 + generation % 4
            ids = torch.randint(3, 250, (rows, 3 + generation % 5), generator=torch.Generator().manual_seed(generation))
            mask = torch.ones_like(ids)
            mask[1:, : generation % 3] = 0  # left padding in all rows but the first
            options = dict(max_new_tokens=6, do_sample=generation % 2 == 1, attention_mask=mask)
            torch.manual_seed(generation)
            expected = reference.generate(ids, **options)
            torch.manual_seed(generation)
            output = model.generate(ids, **options)
            assert torch.equal(output, expected)
            assert output.verification.checked and not output.verification.caught
            checks += output.verification.checks
        assert not any(model.remote.view.is_convicted(peer) for peer in peers)
        print(f"\n50 honest generations: {checks} checks, nobody convicted")
    finally:
        model.close()
        threaded.process.stop()


def caught(model, liar) -> None:
    name, lying = liar
    assert model.remote.view.is_convicted(lying.peer_id), f"{name} was not caught"


@pytest.mark.slow
def test_greedy_generation_gives_local_tokens_and_convicts_the_liar(model, liar, reference):
    expected = reference.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    for _ in range(4):  # a liar that lies now and then may tell the truth through a whole generation
        output = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(output, expected)
        GOT_AWAY.setdefault(liar[0], []).extend(c.steps_got_away for c in output.verification.caught)
        if output.verification.caught:
            break
    caught(model, liar)
    print(f"\n{liar[0]}: wrong steps before caught {GOT_AWAY[liar[0]]}")


@pytest.mark.slow
def test_seeded_sampling_gives_local_tokens_and_convicts_the_liar(model, liar, reference):
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=50)
        torch.manual_seed(seed)
        output = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=50)
        assert torch.equal(output, expected)
        if output.verification.caught:
            break
    caught(model, liar)


@pytest.mark.slow
def test_training_gets_local_gradients_and_convicts_the_liar(model, liar, reference):
    for seed in range(60):  # one answer in 20 is a lie for "1-step-in-20": a pass and its backward are two answers
        hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(seed))
        assert_blocks_match_local(model, reference, hidden)
        if model.remote.view.is_convicted(liar[1].peer_id):
            break
    caught(model, liar)


def test_spot_check_settings_out_of_range_are_refused_with_their_name():
    for options, name in (({"spot_check_rate": 0.0}, "spot_check_rate"), ({"spot_check_rate": 1.5}, "spot_check_rate"),
                          ({"verify_probation": -1}, "verify_probation")):
        with pytest.raises(ValueError, match=name):
            ClientConfig(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], **options)


def test_timeline_follows_the_cache_through_rollbacks_and_reorders():
    timeline = HopTimeline()
    rows = lambda *values: torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1)  # noqa: E731
    positions, mask = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool)
    for step in range(3):
        timeline.record(rows(step, 10 + step), rows(step, 10 + step), positions, mask)
    timeline.record(rows(5, 15), rows(5, 15), positions, mask, start_position=2, reorder=torch.tensor([1, 1]))
    assert timeline.tokens == 3
    assert timeline.tensors()["inputs"].flatten().tolist() == [10, 11, 5, 10, 11, 15]
    assert timeline.step_of(2) == 2


def test_answers_agree_within_rounding_and_not_beyond():
    reference = torch.randn(2, 5, 64)
    assert tensors_agree(reference + 1e-6 * torch.randn(2, 5, 64), reference, 1e-3)
    lied = reference.clone()
    lied[1, 3] *= 1.01  # one token of one row, off by 1%
    assert not tensors_agree(lied, reference, 1e-3)
    assert tensors_agree(lied, reference, 1e-3, mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 1]]))  # padding: unread
    assert token_errors(torch.full((2, 5, 64), float("nan")), reference).isinf().all()
    assert not tensors_agree(reference[:, :4], reference, 1e-3)


class _View:
    def __init__(self):
        self.convicted: list[str] = []

    def convict(self, peer: str, evidence: str) -> None:
        self.convicted.append(peer)

    def passed_check(self, peer: str) -> None:
        pass


def _settle(answers: dict[str, float], suspect_answer: float):
    """Settles the suspect's answer against opinions of peers "b", "c" (in that order, as far as there are any;
    "b+c" is an opinion of a chain of the two)."""
    view, report = _View(), VerificationReport()

    def recompute(exclude):
        peer = next((peer for peer in answers if not exclude & set(peer.split("+"))), None)
        if peer is None:
            raise MissingBlocksError("model", [0])
        return Opinion(answers[peer], frozenset(peer.split("+")))  # "b+c": a chain of two

    try:
        result = Referee(view).settle("a", suspect_answer, recompute, lambda x, y: x == y, (0, 4), report)
    except VerificationError:
        result = "error"
    return result, view.convicted, report


def test_the_majority_decides_and_the_outvoted_is_convicted():
    assert _settle({"b": 1.0, "c": 2.0}, 1.0)[:2] == (1.0, [])  # agreed at once: no third opinion
    assert _settle({"b": 2.0, "c": 2.0}, 1.0)[:2] == (2.0, ["a"])
    assert _settle({"b": 2.0, "c": 1.0}, 1.0)[:2] == (1.0, ["b"])
    # outvoted, a chain's check cannot say which of its peers was wrong: convicting both would convict an honest one
    assert _settle({"b+c": 2.0, "d": 1.0}, 1.0)[:2] == (1.0, [])
    assert _settle({"b": 2.0, "c": 3.0}, 1.0)[:2] == ("error", [])
    assert _settle({"b": 2.0}, 1.0)[:2] == ("error", [])  # two against one another, nobody to decide
    result, convicted, report = _settle({}, 1.0)
    assert (result, convicted, report.unchecked_blocks, report.checked) == (None, [], [(0, 4)], False)

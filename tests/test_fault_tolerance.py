"""Peers die mid-generation (SIGKILL): the session moves their blocks to a replica, replays the history, and the
tokens are exactly those of a fault-free run."""

import random
import signal

import pytest
import torch
from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from swarm.checkpoint_maker import byte_tokenizer
from tests.test_speculative import local_batched_model

HALVES = ["0:2", "2:4"]


class Swarm:
    """Two replicas of each half of the model; a killed peer is replaced by a fresh one after each generation."""

    def __init__(self, path: str, bootstrap: str):
        self.path, self.bootstrap = path, bootstrap
        self.peers = {peer.peer_id: (span, peer) for span, peer in zip(HALVES * 2, start_peers(path, bootstrap, HALVES * 2))}
        self.killed: list[str] = []

    def kill(self, peer_id: str) -> None:
        span, peer = self.peers.pop(peer_id)
        peer.process.stop(signal.SIGKILL)
        self.killed.append(span)

    def heal(self) -> None:
        if self.killed:
            for span, peer in zip(self.killed, start_peers(self.path, self.bootstrap, self.killed)):
                self.peers[peer.peer_id] = (span, peer)
            self.killed.clear()

    def stop(self) -> None:
        for _, peer in self.peers.values():
            peer.process.stop()


class KillDuringGeneration(StoppingCriteria):
    """Never stops generation; after `after_tokens` new tokens, SIGKILLs a random peer of the session's route."""

    def __init__(self, model, swarm: Swarm, after_tokens: int, rng: random.Random):
        self.model, self.swarm, self.after_tokens, self.rng = model, swarm, after_tokens, rng
        self.calls, self.victim = 0, None

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.after_tokens:
            route = self.model._implicit_session.route
            self.victim = self.rng.choice(route).peer.peer_id
            self.swarm.kill(self.victim)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def swarm(tiny_llama, bootstrap):
    swarm = Swarm(tiny_llama, bootstrap)
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def model(tiny_llama, bootstrap, swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], ban_seconds=600)
    yield model
    model.close()


EARLY_EXIT = "early-exit draft"  # stands for a fresh draft model in SCENARIOS


def with_draft(options: dict, checkpoint: str) -> dict:
    """`options` with a draft model loaded afresh where they name one: transformers' heuristic draft length lives in
    the draft's generation config and carries over from call to call, so each run starts from the same length."""
    options = dict(options)
    if options.get("assistant_model") == EARLY_EXIT:
        options["assistant_model"] = LlamaForCausalLM.from_pretrained(checkpoint, num_hidden_layers=1).eval()
    return options


def generate_with_kill(model, swarm, inputs, options, rng) -> torch.Tensor:
    # stopping criteria run once per step; a speculative step may add several tokens, so the kill comes early
    killer = KillDuringGeneration(model, swarm, after_tokens=rng.randint(2, 12), rng=rng)
    seed = options.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([killer]), **options)
    assert killer.victim is not None, "the peer was never killed"
    swarm.heal()
    return output


SCENARIOS = {
    "greedy": (["Once upon a time"], dict(max_new_tokens=64, do_sample=False), 4),
    "sampling": (["Sampling"], dict(max_new_tokens=48, do_sample=True, temperature=0.9, top_k=50, seed=7), 2),
    "beam-search": (["Beams"], dict(max_new_tokens=32, num_beams=3, do_sample=False), 2),
    "batch-of-3": (["first prompt", "second", "a third one"], dict(max_new_tokens=32, do_sample=False), 2),
    # speculative: draft tokens checked in one step, rejected ones rolled back; the replay holds only accepted ones
    "prompt-lookup": (["ab ab ab ab ab"], dict(max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=4), 2),
    "prompt-lookup-sampling": (
        ["ab ab ab ab ab"], dict(max_new_tokens=40, do_sample=True, temperature=0.5, prompt_lookup_num_tokens=4, seed=3), 2
    ),
    # a draft model's tokens (the checkpoint's first block and head), accepted greedily or by speculative sampling
    "assisted": (["ab ab ab ab ab"], dict(max_new_tokens=40, do_sample=False, assistant_model=EARLY_EXIT), 2),
    "assisted-sampling": (
        ["ab ab ab ab ab"], dict(max_new_tokens=40, do_sample=True, temperature=0.8, assistant_model=EARLY_EXIT, seed=5), 2
    ),
    # a batch drafting row by row (client/batched_speculation.py): plain greedy's tokens, which are the reference
    "batch-prompt-lookup": (
        ["ab ab ab ab ab", "abc abc abc", "ab"], dict(max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=4), 2
    ),
    # sampled, its reference is the same batched loop on a local model, seed for seed
    "batch-prompt-lookup-sampling": (
        ["ab ab ab ab ab", "abc abc abc", "ab"],
        dict(max_new_tokens=32, do_sample=True, temperature=0.7, prompt_lookup_num_tokens=4, seed=11), 2,
    ),
}
DRAFT_OPTIONS = ("prompt_lookup_num_tokens", "assistant_model")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_generation_survives_peer_kills(model, swarm, reference, tiny_llama, scenario):
    texts, options, runs = SCENARIOS[scenario]
    inputs = byte_tokenizer()(texts, return_tensors="pt", padding=True)
    rng = random.Random(scenario)
    seed = options.get("seed")
    # transformers drafts for one sequence only: a greedy batch's local reference is plain greedy decoding, a sampled
    # one's the swarm's batched loop on a local model
    batch, sampled = len(texts) > 1, options.get("do_sample", False)
    left_out = ("seed", *DRAFT_OPTIONS) if batch and not sampled else ("seed",)
    local_options = {key: value for key, value in options.items() if key not in left_out}
    if batch and sampled:
        reference = local_batched_model(tiny_llama)
    if seed is not None:
        torch.manual_seed(seed)
    expected = reference.generate(**inputs, **with_draft(local_options, tiny_llama))
    for _ in range(runs):
        assert torch.equal(generate_with_kill(model, swarm, inputs, with_draft(options, tiny_llama), rng), expected)


@pytest.mark.slow
def test_training_step_survives_a_kill_between_forward_and_backward(model, swarm):
    hidden = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1))

    def gradient(victim_rng: random.Random | None = None) -> torch.Tensor:
        inputs = hidden.clone().requires_grad_()
        used = []
        calls = model.remote.call
        model.remote.call = lambda hop, *args: used.append(hop.peer.peer_id) or calls(hop, *args)
        try:
            output = model.remote(inputs)
        finally:
            del model.remote.call
        if victim_rng is not None:
            victim = victim_rng.choice(used)
            swarm.kill(victim)
        (output * weights).sum().backward()
        if victim_rng is not None:
            assert model.remote.view.is_banned(victim)  # backward found it dead and went elsewhere
        return inputs.grad

    expected = gradient()
    assert torch.equal(gradient(random.Random(0)), expected)
    swarm.heal()

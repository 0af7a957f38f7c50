"""Speculative decoding through the swarm: transformers' assisted generation (a local draft model, or prompt lookup)
checks several draft tokens in one step through the peers, which roll their caches back to the accepted prefix.
The tokens equal those of local transformers' assisted generation on the same checkpoint (greedy, seeded sampling)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.checkpoint_maker import byte_tokenizer

SPANS = {"first": "0:2", "second": "2:4"}
REPEATING = ["the swarm and the swarm and the swarm and"]  # prompt lookup finds drafts in it


@pytest.fixture(scope="module")
def model(tiny_llama, bootstrap, peers):
    allowed = tuple(peer.peer_id for peer in peers.values())
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], allowed_peers=allowed)
    yield model
    model.close()


@pytest.fixture(scope="module")
def early_exit_draft(tiny_llama) -> LlamaForCausalLM:
    """The checkpoint's first block with its embeddings and head, held locally: a draft with no second model."""
    return LlamaForCausalLM.from_pretrained(tiny_llama, num_hidden_layers=1).eval()


def inputs(texts=REPEATING) -> dict[str, torch.Tensor]:
    return byte_tokenizer()(texts, return_tensors="pt")


def generate_both(reference, model, seed: int | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:
    results = []
    for generator in (reference, model):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(generator.generate(**inputs(), **options))
    return results[0], results[1]


@pytest.mark.parametrize("num_tokens", [2, 5])
def test_prompt_lookup_greedy_matches(model, reference, num_tokens):
    expected, actual = generate_both(reference, model, max_new_tokens=30, do_sample=False,
                                     prompt_lookup_num_tokens=num_tokens)
    assert torch.equal(actual, expected)
    assert torch.equal(actual, reference.generate(**inputs(), max_new_tokens=30, do_sample=False))


def test_prompt_lookup_seeded_sampling_matches(model, reference):
    expected, actual = generate_both(reference, model, seed=11, max_new_tokens=30, do_sample=True, temperature=0.7,
                                     top_k=20, prompt_lookup_num_tokens=3)
    assert torch.equal(actual, expected)


def test_assisted_greedy_matches(model, reference, early_exit_draft):
    expected, actual = generate_both(reference, model, max_new_tokens=30, do_sample=False,
                                     assistant_model=early_exit_draft)
    assert torch.equal(actual, expected)
    assert torch.equal(actual, reference.generate(**inputs(), max_new_tokens=30, do_sample=False))


def test_assisted_seeded_sampling_matches(model, reference, early_exit_draft):
    """With a draft model's logits, transformers accepts by speculative sampling (rejection of draft tokens)."""
    expected, actual = generate_both(reference, model, seed=5, max_new_tokens=30, do_sample=True, temperature=0.8,
                                     assistant_model=early_exit_draft)
    assert torch.equal(actual, expected)


def test_history_holds_only_accepted_tokens(model):
    """Rejected draft tokens leave the replay history, so a replacement peer replays what the cache holds."""
    with model.inference_session(max_length=80) as session:
        output = model.generate(**inputs(), max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=5)
        for history in session._history:
            assert sum(hidden.shape[1] for hidden, _ in history) == session.position == output.shape[1] - 1
        steps = sum(1 for _ in session._history[0])
    assert steps < output.shape[1] - inputs()["input_ids"].shape[1]  # fewer round trips than new tokens


def test_batch_of_two_refused_as_locally(model, reference):
    """transformers' assisted generation takes one sequence at a time; the swarm says the same, before any step."""
    two = byte_tokenizer()(["one", "two"], return_tensors="pt")
    for generator in (reference, model):
        with pytest.raises(ValueError, match="batch_size = 1"):
            generator.generate(**two, max_new_tokens=4, prompt_lookup_num_tokens=2)


def test_greedy_drafts_adapt_and_keep_the_tokens(model, reference, early_exit_draft):
    """Greedy speculative decoding chooses its draft lengths from the chain's timings (by default) and still gives
    plain greedy's tokens; draft_length="fixed" keeps transformers' own lengths."""
    plain = reference.generate(**inputs(), max_new_tokens=30, do_sample=False)
    for options in ({"prompt_lookup_num_tokens": 6}, {"assistant_model": early_exit_draft}):
        assert torch.equal(model.generate(**inputs(), max_new_tokens=30, do_sample=False, **options), plain)
        report = model.last_speculation
        assert report is not None and report.steps >= 2 and sum(report.accepted) <= sum(report.drafted)
        assert all(1 <= asked <= options.get("prompt_lookup_num_tokens", 32) for asked in report.asked)
        assert torch.equal(model.generate(**inputs(), max_new_tokens=30, do_sample=False, draft_length="fixed",
                                          **options), plain)
        assert model.last_speculation is None
    with pytest.raises(ValueError, match="draft_length must be one of"):
        model.generate(**inputs(), max_new_tokens=2, prompt_lookup_num_tokens=2, draft_length="long")

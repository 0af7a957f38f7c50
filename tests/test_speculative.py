"""Speculative decoding through the swarm: transformers' assisted generation (a local draft model, or prompt lookup)
checks several draft tokens in one step through the peers, which roll their caches back to the accepted prefix.
The tokens equal those of local transformers' assisted generation on the same checkpoint (greedy, seeded sampling)."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
from client.batched_speculation import BatchedAssistedDecoding
from swarm.checkpoint_maker import byte_tokenizer

SPANS = {"first": "0:2", "second": "2:4"}
NEAR_DRAFT_NOISE = 0.1  # the near draft's rows are then right for 0 to 4 tokens a step
REPEATING = ["the swarm and the swarm and the swarm and"]  # prompt lookup finds drafts in it
UNEVEN = [REPEATING[0], "and the swarm and the swarm and", "swarm and the swarm"]  # three lengths (padded on the left)


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


@pytest.fixture(scope="module")
def near_draft(reference) -> LlamaForCausalLM:
    """The whole checkpoint held locally with its last block perturbed: right most of the time, not always."""
    draft = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in draft.model.layers[-1].mlp.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * NEAR_DRAFT_NOISE * weight.std())
    # four tokens a draft, however unsure (the tiny random model always is: its drafts would stop at one)
    draft.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    return draft


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


def test_a_batch_speculates_with_plain_greedy_tokens(model, reference, near_draft):
    """transformers' assisted generation refuses a batch; the swarm drafts per row and verifies all rows in one step
    (client/batched_speculation.py), with the tokens of plain greedy decoding of the batch, padding and all."""
    batch = byte_tokenizer()(UNEVEN, return_tensors="pt", padding=True)
    new_tokens = 24
    plain = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    with pytest.raises(ValueError, match="batch_size = 1"):
        reference.generate(**batch, max_new_tokens=4, prompt_lookup_num_tokens=2)
    for options in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": near_draft}):
        with model.inference_session(max_length=batch["input_ids"].shape[1] + new_tokens + 4) as session:
            assert torch.equal(model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, **options), plain)
            steps = sum(1 for _ in session._history[0])
        assert model.last_speculation.steps == steps  # what each step drafted and kept, for the caller
        # prompt lookup's drafts are seldom right for the random model; the near draft's often are, in every row
        assert steps < new_tokens / 2 if "assistant_model" in options else steps <= new_tokens
    # a row that ends early (its eos) is padded after it, as plain greedy pads it
    eos = int(plain[1, batch["input_ids"].shape[1] + 3])
    ending = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    expected = reference.generate(**batch, **ending)
    assert torch.equal(model.generate(**batch, prompt_lookup_num_tokens=4, **ending), expected)
    # what the batched loop does not give is refused before any step, with its reason
    with pytest.raises(ValueError, match="returns the sequences only"):
        model.generate(**batch, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2, return_dict_in_generate=True)


def local_batched_model(path: str) -> LlamaForCausalLM:
    """The checkpoint as a local transformers model that speculates on a batch the swarm's way: the one-process
    reference for batched sampling."""
    return type("LocalBatched", (BatchedAssistedDecoding, LlamaForCausalLM), {}).from_pretrained(path).eval()


def test_a_batch_samples_as_the_same_loop_in_one_process(model, tiny_llama, near_draft):
    """Sampled, a speculating batch is checked against the same batched loop on a local transformers model (which
    transformers itself does not have), seed for seed: speculative sampling with the near draft's logits, and
    sampling checked against prompt lookup's drafts."""
    local = local_batched_model(tiny_llama)
    batch = byte_tokenizer()(UNEVEN, return_tensors="pt", padding=True)
    sampling = {"max_new_tokens": 20, "do_sample": True, "temperature": 0.8, "top_k": 40}
    for options in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": near_draft}):
        results = []
        for generator in (local, model):
            torch.manual_seed(21)
            results.append(generator.generate(**batch, **sampling, **options))
        assert torch.equal(results[1], results[0])
        assert model.last_speculation.accepted == local.last_speculation.accepted
    assert sum(model.last_speculation.accepted) > 0  # the near draft's tokens were kept, some steps


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
        fixed = model.last_speculation  # recorded as well, with transformers' own lengths
        assert fixed.steps >= 2 and sum(fixed.accepted) <= sum(fixed.drafted) <= sum(fixed.asked)
        # prompt lookup's configured length; the assistant's is this transformers' default, 20 on a constant schedule
        assert set(fixed.asked) == {options.get("prompt_lookup_num_tokens", 20)}
    assert model.generate(**inputs(), max_new_tokens=4, do_sample=False) is not None
    assert model.last_speculation is None  # no draft, no report
    with pytest.raises(ValueError, match="draft_length must be one of"):
        model.generate(**inputs(), max_new_tokens=2, prompt_lookup_num_tokens=2, draft_length="long")

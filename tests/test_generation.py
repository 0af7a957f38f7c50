"""The swarm gives exactly the tokens (and logits) of local transformers, through chains of 1, 2 and 3 peers."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from client import AutoDistributedModelForCausalLM
from swarm.checkpoint_maker import byte_tokenizer
from swarm.errors import MissingBlocksError

# Peers: one with every block, and pieces that chain as [0:1]+[1:4] and [0:1]+[1:3]+[3:4].
SPANS = {"full": "0:4", "a": "0:1", "b": "1:3", "c": "3:4", "d": "1:4"}
CHAINS = {1: ("full",), 2: ("a", "d"), 3: ("a", "b", "c")}


@pytest.fixture(scope="module", params=sorted(CHAINS), ids=lambda hops: f"{hops}-peers")
def swarm_model(request, tiny_llama, bootstrap, peers):
    allowed = tuple(peers[name].peer_id for name in CHAINS[request.param])
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], allowed_peers=allowed)
    assert len(model.remote.view.chain()) == request.param
    yield model
    model.close()


def prompts(texts: list[str]) -> dict[str, torch.Tensor]:
    return byte_tokenizer()(texts, return_tensors="pt", padding=True)


def test_logits_match(swarm_model, reference):
    inputs = prompts(["The swarm computes", "hi"])
    with torch.no_grad():
        expected = reference(**inputs).logits
    actual = swarm_model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(actual[mask], expected[mask], atol=1e-4, rtol=0)


def test_greedy_matches(swarm_model, reference):
    inputs = prompts(["Once upon a time"])
    expected = reference.generate(**inputs, max_new_tokens=24, do_sample=False)
    actual = swarm_model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(actual, expected)


def test_seeded_sampling_matches(swarm_model, reference):
    inputs = prompts(["Sampling"])
    options = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1234)
    expected = reference.generate(**inputs, **options)
    torch.manual_seed(1234)
    actual = swarm_model.generate(**inputs, **options)
    assert torch.equal(actual, expected)


def test_left_padded_batch_matches(swarm_model, reference):
    inputs = prompts(["a longer first prompt", "short", "middle one"])
    assert not inputs["attention_mask"].all()
    expected = reference.generate(**inputs, max_new_tokens=16, do_sample=False)
    actual = swarm_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(actual, expected)


def test_beam_search_matches(swarm_model, reference):
    inputs = prompts(["Beams", "two prompts"])
    options = dict(max_new_tokens=12, num_beams=3, do_sample=False, num_return_sequences=2)
    expected = reference.generate(**inputs, **options)
    actual = swarm_model.generate(**inputs, **options)
    assert torch.equal(actual, expected)


def test_session_continues_over_two_generate_calls(swarm_model, reference):
    inputs = prompts(["Continue me"])
    expected = reference.generate(**inputs, max_new_tokens=20, do_sample=False)
    with swarm_model.inference_session(max_length=64) as session:
        first = swarm_model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert session.position == first.shape[1] - 1  # the last token is not fed until the next call
        second = swarm_model.generate(first, max_new_tokens=12, do_sample=False)
    assert torch.equal(second, expected)


def test_stopping_criteria_and_streamer(swarm_model, reference):
    tokenizer = byte_tokenizer()
    inputs = prompts(["Stream"])

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 15, dtype=torch.bool)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    options = dict(max_new_tokens=30, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAtLength()]))
    actual = swarm_model.generate(**inputs, streamer=streamer, **options)
    expected = reference.generate(**inputs, **options)
    assert torch.equal(actual, expected) and actual.shape[1] == 15
    assert "".join(streamer) == tokenizer.decode(actual[0, inputs["input_ids"].shape[1] :])


def test_missing_blocks_named(tiny_llama, bootstrap, peers):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=(peers["a"].peer_id, peers["c"].peer_id)
    )
    try:
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 1-2 ") as error:
            model.generate(**prompts(["x"]), max_new_tokens=2)
        assert error.value.missing_blocks == [1, 2]
    finally:
        model.close()

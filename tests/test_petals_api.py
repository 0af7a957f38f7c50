"""What a Petals user's code calls works the same here, against local transformers: sessions continued with
`generate(session=...)` and `generate(None, ...)`, `model.model.layers` as an indexable RemoteSequential, empty steps;
and a step past the session's max_length fails at once with the peer's reason."""

import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM, RemoteSequential
from swarm.errors import RemoteError

SPANS = {"first": "0:2", "second": "2:4"}


@pytest.fixture(scope="module")
def model(tiny_llama, bootstrap, peers):
    allowed = tuple(handle.peer_id for handle in peers.values())
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], allowed_peers=allowed)
    yield model
    model.close()


PROMPT = torch.tensor([[1, 72, 101, 108, 108]])


def test_generate_with_session_continues_like_petals(model, reference):
    expected = reference.generate(PROMPT, max_new_tokens=20, do_sample=False)
    with model.inference_session(max_length=64) as session:
        first = model.generate(PROMPT, max_new_tokens=8, session=session)
        assert torch.equal(first, expected[:, : PROMPT.shape[1] + 8])
        more = model.generate(None, max_new_tokens=12, session=session)  # Petals: only what is new comes back
        assert torch.equal(more, expected[:, PROMPT.shape[1] + 8 :])
        user_turn = torch.tensor([[33, 34]])  # new tokens after everything so far (a chat's next turn)
        reply = model.generate(user_turn, max_new_tokens=6, session=session)
    whole = torch.cat([expected, user_turn], dim=1)
    assert torch.equal(reply, reference.generate(whole, max_new_tokens=6, do_sample=False)[:, expected.shape[1] :])


def test_generate_none_inside_an_active_session_continues_it(model, reference):
    expected = reference.generate(PROMPT, max_new_tokens=14, do_sample=False)
    with model.inference_session(max_length=32):
        first = model.generate(PROMPT, max_new_tokens=6, do_sample=False)  # the whole sequence, transformers' way
        rest = model.generate(max_new_tokens=8, do_sample=False)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)


def test_seeded_sampling_over_a_continued_session_matches(model, reference):
    options = dict(do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    local_first = reference.generate(PROMPT, max_new_tokens=5, **options)
    local_rest = reference.generate(local_first, max_new_tokens=5, **options)
    torch.manual_seed(7)
    with model.inference_session(max_length=32) as session:
        first = model.generate(PROMPT, max_new_tokens=5, session=session, **options)
        rest = model.generate(None, max_new_tokens=5, session=session, **options)
    assert torch.equal(first, local_first) and torch.equal(rest, local_rest[:, local_first.shape[1] :])


def test_blocks_are_an_indexable_remote_sequential(model, reference):
    layers = model.model.layers
    assert isinstance(layers, RemoteSequential) and layers is model.remote and len(layers) == 4
    assert [(part.start_block, part.end_block) for part in layers] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert (layers[-1].start_block, layers[1:3].start_block, len(layers[1:3]), len(layers[2:][1:])) == (3, 1, 2, 1)
    for bad in (slice(None, None, 2), slice(3, 1), 4, -5):
        with pytest.raises(IndexError):
            layers[bad]
    hidden = torch.randn(2, 6, reference.config.hidden_size)
    with torch.no_grad():
        whole = layers(hidden)
        pieces = layers[2:4](layers[0:2](hidden))
    assert torch.allclose(whole, pieces, atol=1e-5, rtol=0)
    with model.inference_session(max_length=16):  # sub-sequences run sessions too (Petals' RemoteSequential does)
        with layers[1:3].inference_session(max_length=8) as session:
            step = session.step(hidden[:1, :3])
    with torch.no_grad():
        assert torch.allclose(step, layers[1:3](hidden[:1, :3]), atol=1e-5, rtol=0)


def test_an_empty_step_answers_nothing_and_changes_nothing(model, reference):
    hidden_size = reference.config.hidden_size
    ids = PROMPT
    with model.remote.inference_session(max_length=16) as session:
        empty = session.step(torch.zeros(1, 0, hidden_size))  # before the session even opened
        assert empty.shape == (1, 0, hidden_size) and session.position == 0
        embeddings = reference.model.embed_tokens(ids)
        first = session.step(embeddings)
        assert session.step(torch.zeros(1, 0, hidden_size)).shape == (1, 0, hidden_size)
        session.step(torch.zeros(1, 0, hidden_size), start_position=3)  # a rollback waits for the next tokens
        again = session.step(embeddings[:, 3:])
    assert session.position == ids.shape[1]
    assert torch.allclose(again, first[:, 3:], atol=1e-4, rtol=1e-4)  # a shorter pass: other kernels


def test_a_step_past_the_peers_max_length_fails_at_once(model, reference):
    hidden = torch.randn(1, 10, reference.config.hidden_size)
    with model.remote.inference_session(max_length=8) as session:
        session.step(hidden[:, :4])
        session.max_length = 64  # a client that believes the peers hold more than they granted
        replaced = []
        session._replace = lambda index: replaced.append(index)
        started = time.perf_counter()
        with pytest.raises(RemoteError) as error:
            session.step(hidden)
    assert error.value.code == "OUT_OF_RANGE" and "past its max_length 8" in error.value.message
    assert replaced == [] and time.perf_counter() - started < 5

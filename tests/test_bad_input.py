"""Bad input to a peer gets a clear error, changes nothing, and the peer keeps serving other sessions."""

import time

import grpc
import pytest
import torch

from peer.local_swarm import start_peers
from swarm import tensors
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.raw_session import HIDDEN, RawSession, expect_error, hidden

CACHE_TOKENS = 256
IDLE_TIMEOUT = 6


@pytest.fixture(scope="module")
def peer(tiny_llama, bootstrap):
    (handle,) = start_peers(
        tiny_llama, bootstrap, ["0:4"],
        "--max-message-mb", "1", "--cache-tokens", str(CACHE_TOKENS), "--session-timeout", str(IDLE_TIMEOUT),
    )
    yield handle
    handle.process.stop()


@pytest.fixture(scope="module")
def stub(peer, connect):
    channel = connect(peer, [("grpc.max_send_message_length", 16 * 2**20)])
    yield pb_grpc.SwarmPeerStub(channel)
    channel.close()


def test_bad_steps_are_refused_and_change_nothing(stub):
    bystander = RawSession(stub, "bystander")  # another user's session, which must keep working throughout
    bystander_first = tensors.decode(bystander.send(hidden(seed=1)).result.hidden_states).clone()

    session = RawSession(stub, "victim", max_length=4)
    expect_error(session.send(hidden(size=HIDDEN + 1)), "INVALID_ARGUMENT", "must be [batch, tokens, 64]")
    expect_error(session.send(hidden(dtype=torch.float16)), "INVALID_ARGUMENT", "must be torch.float32")
    expect_error(session.send(hidden(batch=2)), "INVALID_ARGUMENT", "opened for batch size 1")
    expect_error(session.send(hidden(tokens=5)), "OUT_OF_RANGE", "past its max_length 4")
    expect_error(session.send(hidden(), session_id="nobody"), "NOT_FOUND", "unknown session 'nobody'")
    expect_error(session.send(hidden() * float("nan")), "INVALID_ARGUMENT", "NaN or Inf")
    garbage = pb.Tensor(data=b"\x00" * 7, shape=[1, 1, HIDDEN], dtype="float32")
    step = pb.InferenceStep(session_id="victim", step_id=1, hidden_states=garbage)
    session.requests.put(pb.InferenceRequest(step=step))
    expect_error(next(session.responses), "INVALID_ARGUMENT", "needs 256 bytes, got 7")
    expect_error(
        session.send(hidden(), position_ids=tensors.encode(torch.zeros(1, 2, dtype=torch.int64))),
        "INVALID_ARGUMENT", "position_ids must be int64 [1, 1]",
    )
    expect_error(session.send(hidden(), beam_reorder=tensors.encode(torch.tensor([3]))), "INVALID_ARGUMENT", "beam_reorder")
    empty = session.send(hidden(tokens=0)).result  # what transformers sends with nothing new: answered, as in Petals
    assert list(empty.hidden_states.shape) == [1, 0, HIDDEN] and empty.position == 0
    expect_error(session.send(hidden(tokens=0), start_position=0, has_start_position=True), "INVALID_ARGUMENT", "no tokens")

    # Nothing changed: the session's first real step gives what a fresh session gives.
    result = session.send(hidden(seed=2)).result
    assert result.position == 1
    fresh = RawSession(stub, "fresh")
    expected = tensors.decode(fresh.send(hidden(seed=2)).result.hidden_states)
    assert torch.equal(tensors.decode(result.hidden_states), expected)
    for open_session in (session, fresh):
        open_session.close()

    # The bystander still works and its cache is intact (its second step sees its first token).
    second = bystander.send(hidden(seed=3)).result
    assert second.position == 2
    again = RawSession(stub, "replay")
    assert torch.equal(tensors.decode(again.send(hidden(seed=1)).result.hidden_states), bystander_first)
    assert torch.equal(tensors.decode(again.send(hidden(seed=3)).result.hidden_states), tensors.decode(second.hidden_states))
    bystander.close()
    again.close()


def test_session_open_errors(stub):
    with pytest.raises(grpc.RpcError) as error:
        RawSession(stub, "range", blocks=(2, 6))
    assert error.value.code() == grpc.StatusCode.ABORTED and "this peer serves blocks 0:4" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        RawSession(stub, "huge", max_length=CACHE_TOKENS + 1)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "whole pool" in error.value.details()
    for prompts, complaint in (
        (torch.zeros(3, 2, HIDDEN), r"deep_prompts must be \[4, prefix <= 16, 64\]"),  # blocks
        (torch.zeros(4, 20, HIDDEN), r"deep_prompts must be"),  # longer than the session
        (torch.full((4, 2, HIDDEN), float("nan")), "NaN"),
    ):
        with pytest.raises(grpc.RpcError, match=complaint) as error:
            RawSession(stub, "prompts", deep_prompts=tensors.encode(prompts))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    requests = iter([pb.InferenceRequest(step=pb.InferenceStep(session_id="x"))])
    with pytest.raises(grpc.RpcError) as error:
        next(stub.Inference(requests))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_full_pool_makes_sessions_wait_then_fail(stub):
    holder = RawSession(stub, "holder", max_length=CACHE_TOKENS - 10)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        RawSession(stub, "waiter", max_length=20, alloc_timeout=1.0)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "stayed full" in error.value.details()
    assert time.monotonic() - started >= 1.0
    holder.close()
    deadline = time.monotonic() + 10
    while stub.Info(pb.InfoRequest()).cache_tokens_left < CACHE_TOKENS and time.monotonic() < deadline:
        time.sleep(0.05)
    RawSession(stub, "waiter", max_length=20, alloc_timeout=5.0).close()


def test_forward_errors(stub):
    def forward(**fields):
        return stub.Forward(pb.ForwardRequest(**fields), timeout=30)

    ok = forward(start_block=0, end_block=4, hidden_states=tensors.encode(hidden(tokens=3)))
    assert list(tensors.decode(ok.hidden_states).shape) == [1, 3, HIDDEN]
    cases = [
        (dict(start_block=3, end_block=5), grpc.StatusCode.ABORTED, "not served here"),
        (dict(start_block=0, end_block=4, hidden_states=tensors.encode(hidden(size=3))), grpc.StatusCode.INVALID_ARGUMENT, "hidden_states must be"),
        (dict(start_block=0, end_block=4, hidden_states=pb.Tensor(data=b"abc", shape=[1], dtype="complex")), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
    ]
    for fields, code, text in cases:
        with pytest.raises(grpc.RpcError) as error:
            forward(**fields)
        assert error.value.code() == code and text in error.value.details()


def test_oversized_message_refused(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Forward(pb.ForwardRequest(start_block=0, end_block=4, hidden_states=tensors.encode(hidden(tokens=5000))), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Info(pb.InfoRequest()).end_block == 4


def test_garbage_bytes_refused(peer, stub, connect):
    channel = connect(peer)
    raw_forward = channel.unary_unary("/swarm.SwarmPeer/Forward")  # no serializer: the bytes go as they are
    with pytest.raises(grpc.RpcError) as error:
        raw_forward(b"\xff\xfe not a protobuf \x00\x01", timeout=10)
    assert error.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN)
    raw_inference = channel.stream_stream("/swarm.SwarmPeer/Inference")
    with pytest.raises(grpc.RpcError):
        next(raw_inference(iter([b"\x12\x34garbage"]), timeout=10))
    channel.close()
    assert stub.Info(pb.InfoRequest()).end_block == 4


def test_idle_session_times_out_and_frees_memory(stub):
    session = RawSession(stub, "idle", max_length=64)
    assert stub.Info(pb.InfoRequest()).cache_tokens_left == CACHE_TOKENS - 64
    time.sleep(IDLE_TIMEOUT + 1)
    with pytest.raises(grpc.RpcError) as error:
        session.send(hidden())
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in error.value.details()
    assert stub.Info(pb.InfoRequest()).cache_tokens_left == CACHE_TOKENS


def test_backward_errors(stub):
    inputs = pb.ForwardRequest(start_block=0, end_block=4, hidden_states=tensors.encode(hidden(tokens=3)))

    def backward(grad: torch.Tensor, request: pb.ForwardRequest = inputs):
        return stub.Backward(pb.BackwardRequest(inputs=request, grad_outputs=tensors.encode(grad)), timeout=30)

    ok = backward(torch.ones(1, 3, HIDDEN))
    assert list(tensors.decode(ok.grad_hidden_states).shape) == [1, 3, HIDDEN]
    unserved = pb.ForwardRequest(start_block=2, end_block=6, hidden_states=inputs.hidden_states)
    prompts = lambda shape: tensors.encode(torch.zeros(shape))  # noqa: E731
    lora = lambda name, shape: pb.NamedTensor(name=name, tensor=tensors.encode(torch.zeros(shape)))  # noqa: E731
    with_request = lambda **fields: pb.ForwardRequest(start_block=0, end_block=4, hidden_states=inputs.hidden_states, **fields)  # noqa: E731
    cases = [
        (torch.ones(1, 2, HIDDEN), inputs, grpc.StatusCode.INVALID_ARGUMENT, "grad_outputs must be"),
        (torch.full((1, 3, HIDDEN), float("inf")), inputs, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        (torch.ones(1, 3, HIDDEN), unserved, grpc.StatusCode.ABORTED, "not served here"),
        (torch.ones(1, 3, HIDDEN), with_request(deep_prompts=prompts([3, 1, 2, HIDDEN])), grpc.StatusCode.INVALID_ARGUMENT, "deep_prompts must be [4, 1, prefix, 64]"),
        (torch.ones(1, 3, HIDDEN), with_request(deep_prompts=prompts([4, 1, 5, HIDDEN])), grpc.StatusCode.INVALID_ARGUMENT, "cover 5 positions"),
        (torch.ones(1, 3, HIDDEN), with_request(lora=[lora("0.self_attn.q_proj.lora_A", [2, HIDDEN])], lora_scaling=1),
         grpc.StatusCode.INVALID_ARGUMENT, "needs both lora_A and lora_B"),
        (torch.ones(1, 3, HIDDEN), with_request(lora=[lora("0.self_attn.nope.lora_A", [2, HIDDEN]), lora("0.self_attn.nope.lora_B", [HIDDEN, 2])], lora_scaling=1),
         grpc.StatusCode.OUT_OF_RANGE, "is not a linear layer"),
        (torch.ones(1, 3, HIDDEN), with_request(lora=[lora("0.self_attn.q_proj.lora_A", [2, HIDDEN]), lora("0.self_attn.q_proj.lora_B", [HIDDEN, 3])], lora_scaling=1),
         grpc.StatusCode.INVALID_ARGUMENT, "lora_A must be [rank, 64]"),
    ]
    for grad, request, code, text in cases:
        with pytest.raises(grpc.RpcError) as error:
            backward(grad, request)
        assert error.value.code() == code and text in error.value.details(), error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        backward(torch.ones(1, 3000, HIDDEN), pb.ForwardRequest(start_block=0, end_block=4, hidden_states=tensors.encode(hidden(tokens=3000))))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Info(pb.InfoRequest()).end_block == 4

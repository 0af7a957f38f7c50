"""Peers push a step's output straight to the next peer of the chain; answers and tokens stay those of relaying."""

import socket
import time

import grpc
import pytest
import torch

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from swarm import tensors
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.raw_session import RawSession, expect_error, hidden

IDLE_TIMEOUT = 3


@pytest.fixture(scope="module")
def chain(tiny_llama, bootstrap):
    handles = start_peers(tiny_llama, bootstrap, ["0:2", "2:4"], "--session-timeout", str(IDLE_TIMEOUT))
    yield handles
    for handle in handles:
        handle.process.stop()


@pytest.fixture(scope="module")
def stubs(chain, connect):
    channels = [connect(handle) for handle in chain]
    yield [pb_grpc.SwarmPeerStub(channel) for channel in channels]
    for channel in channels:
        channel.close()


def decoded(response: pb.InferenceResponse) -> torch.Tensor:
    assert response.WhichOneof("kind") == "result", response
    return tensors.decode(response.result.hidden_states)


def test_a_pushed_step_is_answered_on_the_next_session_stream_and_runs_once(chain, stubs):
    first = RawSession(stubs[0], "push-first", blocks=(0, 2))
    second = RawSession(stubs[1], "push-second", blocks=(2, 4))
    relayed = RawSession(stubs[1], "relayed-second", blocks=(2, 4))
    target = pb.PushTarget(peer_id=chain[1].peer_id, session_id="push-second")

    answer = first.send(hidden(seed=1), push_to=[target])
    assert answer.result.pushed and answer.result.position == 1
    pushed = second.receive()  # the client sent the second peer nothing
    assert pushed.result.step_id == 1 and pushed.result.position == 1 and not pushed.result.pushed
    assert torch.equal(decoded(pushed), decoded(relayed.send(decoded(answer))))

    # A client that cannot know whether a push arrived (the first peer died after pushing) sends the step itself:
    # it runs once, and the session's next answer is its next step's.
    second.put(decoded(answer), step_id=1)
    following = second.send(hidden(seed=2), step_id=2)
    assert following.result.step_id == 2 and following.result.position == 2
    assert torch.equal(decoded(following), decoded(relayed.send(hidden(seed=2))))
    expect_error(second.send(hidden(seed=3), step_id=1), "INVALID_ARGUMENT", "ids must increase")
    expect_error(second.send(hidden(seed=3), step_id=0), "INVALID_ARGUMENT", "ids must increase")  # unset
    for session in (first, second, relayed):
        session.close()


def test_a_push_to_a_peer_no_record_announces_is_refused_and_nothing_is_dialled(chain, stubs):
    with socket.socket() as listener:  # stands for an address an attacker names: it must never get a connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        first = RawSession(stubs[0], "orphan-first", blocks=(0, 2))
        for target in (f"127.0.0.1:{listener.getsockname()[1]}", "sw" + "0" * 40):  # an address; an unknown identity
            answer = first.send(hidden(), push_to=[pb.PushTarget(peer_id=target, session_id="nobody")])
            assert not answer.result.pushed and "not announced" in answer.result.push_error
        # A peer that is announced, but not for the block after this session's span (blocks 0:2 -> block 2):
        wrong_block = first.send(hidden(), push_to=[pb.PushTarget(peer_id=chain[0].peer_id, session_id="orphan-first")])
        assert not wrong_block.result.pushed and "not block 2" in wrong_block.result.push_error
        assert first.send(hidden(seed=1)).result.position == 4  # the session went on through all of it
        with pytest.raises(socket.timeout):
            listener.accept()
    first.close()


def test_bad_pushes_change_nothing(chain, stubs, connect):
    session = RawSession(stubs[1], "pushed-garbage", blocks=(2, 4))
    garbage = pb.InferenceStep(
        session_id="pushed-garbage", step_id=1, hidden_states=pb.Tensor(data=b"\x00" * 7, shape=[1, 1, 64], dtype="float32")
    )
    unknown = pb.InferenceStep(session_id="nobody", step_id=1, hidden_states=tensors.encode(hidden()))
    stubs[1].Push(iter([garbage, unknown]), timeout=30)
    expect_error(session.receive(), "INVALID_ARGUMENT", "needs 256 bytes, got 7")  # told on the session's stream
    undecodable = connect(chain[1])
    with pytest.raises(grpc.RpcError):
        undecodable.stream_unary("/swarm.SwarmPeer/Push")(iter([b"\xff\xfe not a protobuf"]), timeout=30)
    undecodable.close()
    answer = session.send(hidden(seed=1))
    assert answer.result.step_id == 1 and answer.result.position == 1
    session.close()


def test_steps_that_come_by_push_keep_a_session_alive(chain, stubs):
    first = RawSession(stubs[0], "alive-first", blocks=(0, 2), max_length=32)
    second = RawSession(stubs[1], "alive-second", blocks=(2, 4), max_length=32)
    target = pb.PushTarget(peer_id=chain[1].peer_id, session_id="alive-second")
    deadline = time.monotonic() + 2 * IDLE_TIMEOUT  # longer than the idle timeout, with nothing from the client
    while time.monotonic() < deadline:
        assert first.send(hidden(), push_to=[target]).result.pushed
        assert second.receive().WhichOneof("kind") == "result"
        time.sleep(0.5)
    for session in (first, second):
        session.close()


def test_generation_is_the_same_pushed_and_relayed(tiny_llama, bootstrap, chain, reference):
    allowed = tuple(handle.peer_id for handle in chain)
    inputs = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected = reference.generate(inputs, **options)
    for peer_to_peer in (True, False):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_llama, initial_peers=[bootstrap], allowed_peers=allowed, peer_to_peer=peer_to_peer
        )
        try:
            assert torch.equal(model.generate(inputs, **options), expected)
        finally:
            model.close()

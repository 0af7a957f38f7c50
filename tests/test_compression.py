"""Activation compression on the wire: each codec's error is bounded, bad bytes are refused, and the client's choice
reaches every hop (answers and pushes) with logits close to local transformers'."""

import grpc
import pytest
import torch

from client import AutoDistributedModelForCausalLM
from swarm import tensors
from swarm.net.compression import check_codec
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.raw_session import RawSession, expect_error, hidden

SPANS = {"first": "0:2", "second": "2:4"}
# Largest relative error of one value (of the block's largest magnitude, for int8) each codec may make.
BOUNDS = {"float16": 2**-10, "bfloat16": 2**-7, "int8": 1 / 254}


@pytest.mark.parametrize("codec", sorted(BOUNDS))
def test_codecs_round_trip_within_their_bounds_and_are_smaller(codec):
    values = torch.randn(3, 5, 200) * torch.logspace(-3, 3, 200)  # outlier channels, as in real hidden states
    message = tensors.encode(values, codec)
    decoded = tensors.decode(message)
    assert decoded.dtype == torch.float32 and decoded.shape == values.shape
    if codec == "int8":
        blocks = torch.nn.functional.pad(values.flatten(), (0, -values.numel() % 64)).view(-1, 64)
        scale = blocks.abs().amax(1, keepdim=True).expand(-1, 64).flatten()[: values.numel()].view(values.shape)
        assert ((decoded - values).abs() <= BOUNDS[codec] * scale * 1.001).all()
        assert len(message.data) < 0.27 * values.numel() * 4
    else:
        subnormal_step = 2**-24 if codec == "float16" else 0.0  # float16's spacing below its smallest normal value
        assert ((decoded - values).abs() <= BOUNDS[codec] * values.abs() + subnormal_step).all()
        assert len(message.data) == values.numel() * 2


def test_bad_compressed_tensors_are_refused():
    message = tensors.encode(torch.randn(2, 64), "int8")
    for broken in (message.data[:-1], message.data + b"\x00"):
        with pytest.raises(tensors.TensorDecodeError, match="needs"):
            tensors.decode(type(message)(data=broken, shape=message.shape, dtype="float32", codec="int8"))
    with pytest.raises(tensors.TensorDecodeError, match="unknown codec"):
        tensors.decode(type(message)(data=message.data, shape=message.shape, dtype="float32", codec="zip"))
    with pytest.raises(tensors.TensorDecodeError, match="codec"):
        tensors.decode(type(message)(data=b"\x00" * 8, shape=[8], dtype="bool", codec="float16"))
    with pytest.raises(ValueError, match="compression must be"):
        check_codec("gzip")


def test_a_peer_answers_in_the_chosen_codec_and_refuses_bad_ones(peers, connect):
    with connect(peers["first"]) as channel:
        stub = pb_grpc.SwarmPeerStub(channel)
        compressed = RawSession(stub, "compressed", blocks=(0, 2), compression="int8")
        plain = RawSession(stub, "plain", blocks=(0, 2))
        answer = compressed.send(hidden(seed=1))
        assert answer.result.hidden_states.codec == "int8"
        exact = tensors.decode(plain.send(hidden(seed=1)).result.hidden_states)
        assert torch.allclose(tensors.decode(answer.result.hidden_states), exact, atol=exact.abs().max().item() / 100)

        broken = tensors.encode(hidden(seed=2), "int8")
        broken.data = broken.data[:-3]
        compressed.requests.put(pb.InferenceRequest(step=pb.InferenceStep(
            session_id="compressed", step_id=2, hidden_states=broken,
        )))
        expect_error(compressed.receive(), "INVALID_ARGUMENT", "needs")
        assert compressed.send(hidden(seed=3), step_id=3).result.position == 2  # the bad step changed nothing
        for session in (compressed, plain):
            session.close()
        with pytest.raises(grpc.RpcError, match="compression must be"):
            RawSession(stub, "bad-codec", blocks=(0, 2), compression="zip")


@pytest.mark.parametrize("compression", ["float16", "bfloat16", "int8"])
def test_generation_and_training_through_compressed_hops_stay_close_to_local(compression, tiny_llama, bootstrap, peers, reference):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=tuple(handle.peer_id for handle in peers.values()),
        compression=compression,
    )
    try:
        inputs = torch.tensor([[5, 6, 7, 8, 9, 10]])
        expected = reference(inputs).logits
        assert (model(inputs).logits - expected).abs().max() <= 0.05 * expected.abs().max()  # forward/backward path
        options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        swarm, local = model.generate(inputs, **options), reference.generate(inputs, **options)  # inference path
        assert (swarm.logits[0] - local.logits[0]).abs().max() <= 0.05 * local.logits[0].abs().max()
    finally:
        model.close()

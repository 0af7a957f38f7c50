"""LoRA adapters hosted by peers (`serve --adapters`): announced, routed to, and equal to local peft."""

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from swarm import tensors
from swarm.checkpoint import Checkpoint
from swarm.dht_node import swarm_dht
from swarm.dht_records import fetch_peer_spans
from swarm.errors import MissingBlocksError
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.test_training import assert_blocks_match_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_path(tiny_llama, tmp_path_factory):
    """A peft adapter with random (non-zero) factors on attention and MLP linears, saved as peft saves it."""
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapters") / "style"
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_peft(tiny_llama, adapter_path):
    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), adapter_path).eval()


@pytest.fixture(scope="module")
def swarm(tiny_llama, bootstrap, adapter_path):
    """Two peers host the adapter (blocks split 2+2); a third serves every block without it."""
    hosting = start_peers(tiny_llama, bootstrap, ["0:2", "2:4"], "--adapters", str(adapter_path))
    (plain,) = start_peers(tiny_llama, bootstrap, ["0:4"])
    yield hosting, plain
    for peer in [*hosting, plain]:
        peer.process.stop()


def client(tiny_llama, bootstrap, swarm, adapter: str):
    hosting, plain = swarm
    allowed = tuple(peer.peer_id for peer in [*hosting, plain])
    return AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=[bootstrap], allowed_peers=allowed, active_adapter=adapter
    )


def test_records_announce_the_hosted_adapters(tiny_llama, bootstrap, swarm):
    hosting, plain = swarm
    dht, _ = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)
    try:
        spans = {span.peer_id: span for span in fetch_peer_spans(dht, Checkpoint(tiny_llama).model_prefix(), 4)}
    finally:
        dht.shutdown()
    assert [spans[peer.peer_id].record.adapters for peer in hosting] == [("style",), ("style",)]
    assert spans[plain.peer_id].record.adapters == ()


def test_generation_with_a_hosted_adapter_equals_local_peft(tiny_llama, bootstrap, swarm, local_peft, reference):
    hosting, plain = swarm
    input_ids = torch.tensor([[1, 40, 50, 60, 70], [1, 90, 80, 70, 60]])
    model = client(tiny_llama, bootstrap, swarm, "style")
    try:
        with model.inference_session(max_length=32) as session:
            output = model.generate(input_ids, max_new_tokens=12, do_sample=False)
            assert [hop.peer.peer_id for hop in session.route] == [peer.peer_id for peer in hosting]
        with torch.no_grad():
            expected = local_peft.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False)
            assert torch.equal(output, expected)
            assert not torch.equal(output, reference.generate(input_ids, max_new_tokens=12, do_sample=False))
            assert torch.allclose(model(input_ids).logits, local_peft(input_ids=input_ids).logits, atol=1e-4, rtol=0)
    finally:
        model.close()


def test_gradients_through_a_hosted_adapter_equal_local_peft(tiny_llama, bootstrap, swarm, local_peft):
    model = client(tiny_llama, bootstrap, swarm, "style")
    try:
        hidden = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1))
        assert_blocks_match_local(model, local_peft.base_model.model, hidden)
    finally:
        model.close()


def test_an_adapter_nobody_hosts_is_a_clear_error(tiny_llama, bootstrap, swarm, connect):
    model = client(tiny_llama, bootstrap, swarm, "nope")
    try:
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 0-3 of model .* with adapter 'nope'"):
            model.generate(torch.tensor([[1, 40]]), max_new_tokens=2)
    finally:
        model.close()
    hosting, _ = swarm
    with connect(hosting[0]) as channel:
        request = pb.ForwardRequest(start_block=0, end_block=2, hidden_states=tensors.encode(torch.zeros(1, 2, 64)),
                                    adapter="nope")
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.SwarmPeerStub(channel).Forward(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "hosts no adapter 'nope'; it hosts ['style']" in error.value.details()

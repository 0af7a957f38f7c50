"""Quantized peers (--quant int8 / nf4) compute exactly what local `transformers` computes when it loads the same
checkpoint with the matching quantization config: tokens, logits and gradients. Their quantization is announced,
clients choose by it, and a replacement peer stores its weights as the one it replaces."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from peer.resources import DoesNotFitError, blocks_that_fit, cache_bytes_per_token
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import byte_tokenizer, save_random_checkpoint, tiny_llama_config
from swarm.dht_node import swarm_dht
from swarm.dht_records import fetch_peer_spans
from swarm.errors import MissingBlocksError
from swarm.quantization import local_reference, quantized_bytes, stored_bytes, without_cpu_repacking
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc
from tests.test_training import LORA, batch, close_relative, local_lora_model, run_local_blocks

# name: (span, quantization); the nf4 halves chain, the int8 and exact peers hold every block.
PEERS = {"nf4-a": ("0:2", "nf4"), "nf4-b": ("2:4", "nf4"), "int8": ("0:4", "int8"), "exact": ("0:4", "none")}
CHAINS = {"int8": ("int8",), "nf4": ("nf4-a", "nf4-b")}


@pytest.fixture(scope="module")
def peers(tiny_llama, bootstrap):
    spans = [span for span, _ in PEERS.values()]
    handles = start_peers(tiny_llama, bootstrap, spans, options_per_span=[("--quant", mode) for _, mode in PEERS.values()])
    yield dict(zip(PEERS, handles))
    for handle in handles:
        handle.process.stop()


def swarm_model(path: str, bootstrap: str, peers: dict, names, **options):
    allowed = tuple(peers[name].peer_id for name in names)
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[bootstrap], allowed_peers=allowed, **options)


@pytest.mark.parametrize("mode", sorted(CHAINS))
def test_quantized_peers_give_local_quantized_tokens_and_gradients(mode, tiny_llama, bootstrap, peers, reference):
    local = local_reference(tiny_llama, mode)
    inputs = byte_tokenizer()(["Quantized blocks", "hi"], return_tensors="pt", padding=True)
    model = swarm_model(tiny_llama, bootstrap, peers, CHAINS[mode])
    try:
        assert {hop.peer.record.quantization for hop in model.remote.view.chain()} == {mode}
        greedy = dict(max_new_tokens=20, do_sample=False)
        expected = local.generate(**inputs, **greedy)
        assert torch.equal(model.generate(**inputs, **greedy), expected)
        assert not torch.equal(expected, reference.generate(**inputs, **greedy)), "quantization changed nothing"
        sampling = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=40)
        torch.manual_seed(7)
        expected = local.generate(**inputs, **sampling)
        torch.manual_seed(7)
        assert torch.equal(model.generate(**inputs, **sampling), expected)

        hidden = torch.randn(2, 6, reference.config.hidden_size, generator=torch.Generator().manual_seed(3))
        swarm_input, local_input = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        swarm_output, local_output = model.remote(swarm_input), run_local_blocks(local, local_input)
        assert torch.allclose(swarm_output, local_output, atol=1e-5, rtol=0)
        weights = torch.randn_like(local_output)
        (swarm_output * weights).sum().backward()
        (local_output * weights).sum().backward()
        assert (swarm_input.grad - local_input.grad).norm() <= 1e-4 * local_input.grad.norm()
    finally:
        model.close()


@pytest.mark.parametrize("mode", sorted(CHAINS))
def test_lora_trains_through_quantized_peers_as_local_peft_does(mode, tiny_llama, bootstrap, peers):
    """QLoRA through the swarm: the client's LoRA factors get local peft's gradients on the quantized model."""
    model = swarm_model(tiny_llama, bootstrap, peers, CHAINS[mode], tuning_mode="lora", lora_config=LORA)
    try:
        with torch.no_grad():  # B starts at zero (as in peft): non-zero, every gradient matters
            for lora_b in model.lora.lora_B:
                lora_b.normal_(0, 0.1)
        local = local_lora_model(local_reference(tiny_llama, mode), model)
        ids, labels = batch(seed=1)
        model(input_ids=ids, labels=labels).loss.backward()
        local(input_ids=ids, labels=labels).loss.backward()
        local_grads = {name.replace(".default", ""): p.grad for name, p in local.named_parameters() if p.requires_grad}
        assert len(local_grads) == len(model.lora.names) * 2
        for name, lora_a, lora_b in zip(model.lora.names, model.lora.lora_A, model.lora.lora_B):
            assert close_relative(lora_a.grad, local_grads[model.lora.peft_name(name, "lora_A")])
            assert close_relative(lora_b.grad, local_grads[model.lora.peft_name(name, "lora_B")])
    finally:
        model.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' and torchao's GPU kernels)")
@pytest.mark.parametrize("mode", sorted(CHAINS))
def test_quantized_peers_on_a_gpu_give_local_quantized_tokens(mode, tiny_llama, bootstrap):
    [handle] = start_peers(tiny_llama, bootstrap, ["0:4"], "--device", "cuda", "--quant", mode)
    try:
        local = local_reference(tiny_llama, mode, device_map="cuda")
        model = swarm_model(tiny_llama, bootstrap, {"gpu": handle}, ("gpu",))
        try:
            inputs = byte_tokenizer()(["On a GPU"], return_tensors="pt")
            options = dict(max_new_tokens=16, do_sample=False)
            expected = local.generate(**inputs.to("cuda"), **options).cpu()
            assert torch.equal(model.generate(**inputs.to("cpu"), **options), expected)
        finally:
            model.close()
    finally:
        handle.process.stop()


def test_the_quantization_is_announced_and_clients_choose_by_it(tiny_llama, bootstrap, peers, connect):
    dht = swarm_dht(initial_peers=[bootstrap], client_mode=True, start=True)[0]
    try:
        records = {span.peer_id: span.record for span in fetch_peer_spans(dht, Checkpoint(tiny_llama).model_prefix(), 4)}
    finally:
        dht.shutdown()
    for name, (_, mode) in PEERS.items():
        assert records[peers[name].peer_id].quantization == mode
        info = pb_grpc.SwarmPeerStub(connect(peers[name])).Info(pb.InfoRequest(), timeout=10)
        assert info.quantization == mode
    status = subprocess.run([sys.executable, "-m", "peer.cli", "status", "--initial-peers", bootstrap, "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    shown = {peer["peer_id"]: peer["quantization"] for model in json.loads(status.stdout)["models"] for peer in model["peers"]}
    assert all(shown[peers[name].peer_id] == mode for name, (_, mode) in PEERS.items())

    everyone = tuple(PEERS)
    for wanted, route in [("none", {"exact"}), ("int8", {"int8"}), ("nf4", {"nf4-a", "nf4-b"})]:
        model = swarm_model(tiny_llama, bootstrap, peers, everyone, quantization=wanted)
        try:
            names = {name for name in PEERS for hop in model.remote.view.chain() if hop.peer.peer_id == peers[name].peer_id}
            assert names == route
        finally:
            model.close()
    model = swarm_model(tiny_llama, bootstrap, peers, ("nf4-a", "nf4-b", "int8"), quantization="none")
    try:
        with pytest.raises(MissingBlocksError, match="with none weights"):
            model.generate(torch.tensor([[5, 6]]), max_new_tokens=1)
    finally:
        model.close()
    with pytest.raises(ValueError, match="quantization must be"):
        AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], quantization="int3")


class AtToken(StoppingCriteria):
    """Never stops generation; runs `action` once, after `tokens` new tokens."""

    def __init__(self, tokens: int, action):
        self.tokens, self.action, self.calls = tokens, action, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.tokens:
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_replacement_stores_its_weights_as_the_peer_it_replaces(tiny_llama, bootstrap, peers):
    """An nf4 peer dies mid-generation where an exact peer and a spare nf4 peer serve its blocks: the spare takes
    over and the tokens are local nf4's. When the last nf4 peer of those blocks dies too, the exact one takes over
    and the session says its weights changed."""
    first, spare = start_peers(tiny_llama, bootstrap, ["0:2", "0:2"], "--quant", "nf4")
    local = local_reference(tiny_llama, "nf4")
    inputs = byte_tokenizer()(["Replacing"], return_tensors="pt")
    model = swarm_model(tiny_llama, bootstrap, {"first": first, "nf4-b": peers["nf4-b"]}, ("first", "nf4-b"),
                        ban_seconds=600)
    try:
        def kill_first_and_allow_others():
            model.remote.config.allowed_peers += (spare.peer_id, peers["exact"].peer_id)
            model.remote.view.peer_spans(refresh=True)
            first.process.stop(signal.SIGKILL)

        options = dict(max_new_tokens=16, do_sample=False)
        with model.inference_session(max_length=64) as session:
            killer = StoppingCriteriaList([AtToken(4, kill_first_and_allow_others)])
            output = model.generate(**inputs, **options, stopping_criteria=killer)
            assert torch.equal(output, local.generate(**inputs, **options))
            assert [hop.peer.peer_id for hop in session.route] == [spare.peer_id, peers["nf4-b"].peer_id]
            assert session.quantization_changes == []

            spare.process.stop(signal.SIGKILL)
            model.generate(output, max_new_tokens=4, do_sample=False)
            assert session.route[0].peer.peer_id == peers["exact"].peer_id
            assert session.quantization_changes == ["blocks 0:2: nf4 -> none"]
    finally:
        model.close()
        first.process.stop()
        spare.process.stop()


@pytest.mark.parametrize(("mode", "largest_share"), [("int8", 0.55), ("nf4", 0.30)])
def test_quantized_blocks_take_the_memory_they_should(mode, largest_share, tmp_path):
    """A quantized block holds at most `largest_share` of its bfloat16 size, and volunteers count it right."""
    path = save_random_checkpoint(tmp_path, tiny_llama_config(hidden_size=256, num_layers=2))
    checkpoint = Checkpoint(path)
    bfloat16 = stored_bytes(BlockSpan.from_checkpoint(checkpoint, 0, 1, torch.bfloat16).layers[0])
    exact = BlockSpan.from_checkpoint(checkpoint, 0, 1, torch.float32).layers[0]
    quantized = BlockSpan.from_checkpoint(checkpoint, 0, 1, torch.float32, quantization=mode).layers[0]
    assert stored_bytes(quantized) <= largest_share * bfloat16
    assert stored_bytes(quantized) == quantized_bytes(exact, mode, torch.float32)

    cache = 100 * cache_bytes_per_token(checkpoint.config, torch.float32)
    budget = 2 * (stored_bytes(quantized) + cache)
    assert blocks_that_fit(checkpoint, torch.float32, budget, 100, mode) == 2
    with pytest.raises(DoesNotFitError):  # not even one block in float32
        blocks_that_fit(checkpoint, torch.float32, budget, 100)


def test_a_checkpoint_stored_in_nf4_is_served_as_it_is(tiny_llama, bootstrap, tmp_path):
    """A checkpoint that transformers saved quantized (bitsandbytes NF4) is served as stored, each peer reading
    only its blocks' tensors, and generates what local transformers loading that checkpoint generates."""
    stored = tmp_path / "nf4"
    local_reference(tiny_llama, "nf4").save_pretrained(stored)
    refused = subprocess.run([sys.executable, "-m", "peer.cli", "serve", str(stored), "--blocks", "0:2", "--new-swarm",
                              "--quant", "int8"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == ["Error: the checkpoint is stored in nf4: it cannot be served with --quant int8"]

    handles = start_peers(stored, bootstrap, ["0:2", "2:4"])
    try:
        assert all(handle.compute.startswith("float32, nf4 weights") for handle in handles)
        local = without_cpu_repacking(LlamaForCausalLM.from_pretrained(stored, device_map="cpu").eval())
        model = AutoDistributedModelForCausalLM.from_pretrained(
            stored, initial_peers=[bootstrap], allowed_peers=tuple(handle.peer_id for handle in handles)
        )
        try:
            assert {hop.peer.record.quantization for hop in model.remote.view.chain()} == {"nf4"}
            inputs = byte_tokenizer()(["Stored quantized"], return_tensors="pt")
            options = dict(max_new_tokens=16, do_sample=False)
            assert torch.equal(model.generate(**inputs, **options), local.generate(**inputs, **options))
        finally:
            model.close()
    finally:
        for handle in handles:
            handle.process.stop()

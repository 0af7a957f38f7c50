"""Gradients through the swarm equal local autograd: inputs, soft prompts, deep prompts, client-owned LoRA."""

import contextlib
import copy

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from client import AutoDistributedModelForCausalLM
from peer.local_swarm import start_peers
from swarm.wire import swarm_peer_pb2 as pb

SPANS = {"full": "0:4", "a": "0:1", "b": "1:4"}
CHAINS = {1: ("full",), 2: ("a", "b")}
PREFIX = 3
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.fixture(params=sorted(CHAINS), ids=lambda hops: f"{hops}-peers")
def allowed(request, peers):
    return tuple(peers[name].peer_id for name in CHAINS[request.param])


def swarm_model(path, bootstrap, allowed, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[bootstrap], allowed_peers=allowed, **options)


def batch(seed: int = 0, rows: int = 3, length: int = 8):
    ids = torch.randint(3, 250, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> bool:
    return (actual - expected).norm() <= tolerance * expected.norm()


def run_local_blocks(reference, hidden):
    """The reference's blocks alone, as the swarm runs them (no final norm)."""
    batch_size, length = hidden.shape[:2]
    position_ids = torch.arange(length).expand(batch_size, length)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=reference.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    rotary = reference.model.rotary_emb(hidden, position_ids)
    for layer in reference.model.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    return hidden


def assert_blocks_match_local(model, local_model, hidden: torch.Tensor) -> None:
    """The swarm's blocks give `local_model`'s blocks' outputs (1e-4) and input gradients (1e-4 relative)."""
    swarm_input, local_input = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    swarm_output = model.remote(swarm_input)
    local_output = run_local_blocks(local_model, local_input)
    assert torch.allclose(swarm_output, local_output, atol=1e-4, rtol=0)
    weights = torch.randn_like(local_output)
    (swarm_output * weights).sum().backward()
    (local_output * weights).sum().backward()
    assert close_relative(swarm_input.grad, local_input.grad)


def test_input_gradients_with_sub_batches(tiny_llama, bootstrap, allowed, reference):
    # A message limit this small makes every request carry one row: 5 sub-batches per hop.
    model = swarm_model(tiny_llama, bootstrap, allowed, max_message_bytes=16 * 1024)
    try:
        assert model.remote._sub_batch_size(torch.zeros(5, 12, 64)) == 1
        hidden = torch.randn(5, 12, 64, generator=torch.Generator().manual_seed(0))
        assert_blocks_match_local(model, reference, hidden)
    finally:
        model.close()


@contextlib.contextmanager
def deep_prompts_added(reference, deep_prompts):
    """Local deep prompt tuning: before every block, the block's prompts are added to the first PREFIX positions
    of a pass that starts at position 0 (a training pass or generation's prefill, not its later steps)."""
    handles = []
    for index, layer in enumerate(reference.model.layers if deep_prompts is not None else []):
        def add_prompt(_module, args, kwargs, index=index):
            hidden = args[0]
            if hidden.shape[1] < PREFIX:
                return None
            hidden = torch.cat([hidden[:, :PREFIX] + deep_prompts[index], hidden[:, PREFIX:]], dim=1)
            return (hidden, *args[1:]), kwargs
        handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def local_prompt_loss(reference, ids, labels, prompts, deep_prompts=None):
    embeds = reference.model.embed_tokens(ids)
    rows = ids.shape[0]
    inputs = torch.cat([prompts.expand(rows, -1, -1), embeds], dim=1)
    labels = torch.cat([torch.full((rows, PREFIX), -100), labels], dim=1)
    with deep_prompts_added(reference, deep_prompts):
        return reference(inputs_embeds=inputs, labels=labels).loss


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_match_local(tiny_llama, bootstrap, allowed, reference, mode):
    model = swarm_model(tiny_llama, bootstrap, allowed, tuning_mode=mode, num_prefix_tokens=PREFIX)
    try:
        tuning = model.prompt_tuning
        with torch.no_grad():
            if tuning.deep_prompts is not None:
                tuning.deep_prompts.normal_(0, 0.5)
        assert [name for name, p in model.named_parameters() if p.requires_grad] == (
            ["prompt_tuning.prompts"] + (["prompt_tuning.deep_prompts"] if mode == "deep_ptune" else [])
        )
        ids, labels = batch()
        model(input_ids=ids, labels=labels).loss.backward()
        prompts = tuning.prompts.detach().clone().requires_grad_()
        deep = None if tuning.deep_prompts is None else tuning.deep_prompts.detach().clone().requires_grad_()
        local_loss = local_prompt_loss(reference, ids, labels, prompts, deep)
        local_loss.backward()
        assert close_relative(tuning.prompts.grad, prompts.grad)
        if deep is not None:
            assert close_relative(tuning.deep_prompts.grad, deep.grad)
    finally:
        model.close()


def local_lora_model(reference, swarm_model):
    local = get_peft_model(copy.deepcopy(reference), copy.deepcopy(LORA))
    set_peft_model_state_dict(local, swarm_model.lora.peft_state_dict())
    return local


def test_lora_gradients_match_local(tiny_llama, bootstrap, allowed, reference):
    model = swarm_model(tiny_llama, bootstrap, allowed, tuning_mode="lora", lora_config=LORA)
    try:
        with torch.no_grad():  # B starts at zero (as in peft); make it non-zero so that every gradient is
            for lora_b in model.lora.lora_B:
                lora_b.normal_(0, 0.1)
        local = local_lora_model(reference, model)
        ids, labels = batch(seed=1)
        model(input_ids=ids, labels=labels).loss.backward()
        local(input_ids=ids, labels=labels).loss.backward()
        local_grads = {name.replace(".default", ""): p.grad for name, p in local.named_parameters() if p.requires_grad}
        assert len(local_grads) == len(model.lora.names) * 2 == 16
        for name, lora_a, lora_b in zip(model.lora.names, model.lora.lora_A, model.lora.lora_B):
            assert close_relative(lora_a.grad, local_grads[model.lora.peft_name(name, "lora_A")])
            assert close_relative(lora_b.grad, local_grads[model.lora.peft_name(name, "lora_B")])
    finally:
        model.close()


@pytest.mark.parametrize("mode", ["ptune", "lora"])
def test_optimizer_steps_lower_the_loss_like_local(tiny_llama, bootstrap, peers, reference, mode):
    options = dict(tuning_mode=mode, num_prefix_tokens=PREFIX, lora_config=LORA)
    model = swarm_model(tiny_llama, bootstrap, (peers["a"].peer_id, peers["b"].peer_id), **options)
    try:
        if mode == "lora":
            local = local_lora_model(reference, model)
            local_parameters = [p for p in local.parameters() if p.requires_grad]
            local_loss = lambda ids, labels: local(input_ids=ids, labels=labels).loss  # noqa: E731
        else:
            prompts = model.prompt_tuning.prompts.detach().clone().requires_grad_()
            local_parameters = [prompts]
            local_loss = lambda ids, labels: local_prompt_loss(reference, ids, labels, prompts)  # noqa: E731
        swarm_parameters = [p for p in model.parameters() if p.requires_grad]
        swarm_optimizer = torch.optim.AdamW(swarm_parameters, lr=0.05)
        local_optimizer = torch.optim.AdamW(local_parameters, lr=0.05)
        ids, labels = batch(seed=2, rows=2, length=10)
        losses = []
        for _ in range(4):
            for optimizer, loss in ((swarm_optimizer, model(input_ids=ids, labels=labels).loss), (local_optimizer, local_loss(ids, labels))):
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        swarm_values = torch.cat([p.detach().flatten() for p in swarm_parameters])
        if mode == "lora":
            by_name = {n.replace(".default", ""): p for n, p in local.named_parameters() if p.requires_grad}
            local_values = torch.cat([
                by_name[model.lora.peft_name(name, kind)].detach().flatten()
                for kind in ("lora_A", "lora_B") for name in model.lora.names
            ])
        else:
            local_values = torch.cat([p.detach().flatten() for p in local_parameters])
        assert torch.allclose(swarm_values, local_values, atol=1e-4, rtol=1e-4)
    finally:
        model.close()


def test_lora_tuned_model_generates_like_local_peft(tiny_llama, bootstrap, allowed, reference):
    model = swarm_model(tiny_llama, bootstrap, allowed, tuning_mode="lora", lora_config=LORA)
    try:
        with torch.no_grad():
            for lora_b in model.lora.lora_B:
                lora_b.normal_(0, 0.3)
        local = local_lora_model(reference, model)
        ids = torch.tensor([[1, 84, 104, 101, 32]])
        expected = local.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert not torch.equal(expected, reference.generate(ids, max_new_tokens=12, do_sample=False))  # LoRA matters
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    finally:
        model.close()


def test_sequence_classification_head_trains_like_local(tiny_llama, bootstrap, peers, reference):
    from transformers import LlamaForSequenceClassification

    from client import DistributedModelForSequenceClassification

    model = DistributedModelForSequenceClassification.from_pretrained(
        tiny_llama, num_labels=3, initial_peers=[bootstrap], allowed_peers=(peers["a"].peer_id, peers["b"].peer_id)
    )
    try:
        local = LlamaForSequenceClassification.from_pretrained(tiny_llama, num_labels=3).eval()
        local.model.requires_grad_(False)
        with torch.no_grad():
            model.score.weight.copy_(local.score.weight)
        assert [name for name, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
        ids = torch.tensor([[0, 0, 5, 17, 42, 99], [7, 250, 31, 64, 12, 3], [0, 9, 8, 7, 6, 5]])  # left-padded rows
        mask, labels = (ids != 0).long(), torch.tensor([0, 2, 1])
        with torch.no_grad():
            assert torch.allclose(model(ids, mask).logits, local(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
        optimizers = [torch.optim.AdamW([model.score.weight], lr=0.1), torch.optim.AdamW([local.score.weight], lr=0.1)]
        losses = []
        for _ in range(3):
            for optimizer, loss in zip(optimizers, (model(ids, mask, labels).loss, local(input_ids=ids, attention_mask=mask, labels=labels).loss)):
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert torch.allclose(model.score.weight, local.score.weight, atol=1e-4)
    finally:
        model.close()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuned_model_generates_like_local(tiny_llama, bootstrap, allowed, reference, mode):
    """Trained prompts go before the prompt on the peers (deep ones travel when the session opens); local: the
    same embeddings through `inputs_embeds`. A left-padded batch, and a second generate continuing the session."""
    model = swarm_model(tiny_llama, bootstrap, allowed, tuning_mode=mode, num_prefix_tokens=PREFIX)
    try:
        with torch.no_grad():
            model.prompt_tuning.prompts.normal_(0, 1.0)
            if mode == "deep_ptune":
                model.prompt_tuning.deep_prompts.normal_(0, 1.0)
        prompts = model.prompt_tuning.prompts.detach().expand(2, -1, -1)
        deep_prompts = None if mode == "ptune" else model.prompt_tuning.deep_prompts.detach()

        def local_generate(ids, mask, new_tokens, deep_prompts=deep_prompts):
            embeds = torch.cat([prompts, reference.model.embed_tokens(ids)], dim=1)
            full_mask = torch.cat([torch.ones(2, PREFIX, dtype=torch.long), mask], dim=1)
            with deep_prompts_added(reference, deep_prompts):
                return reference.generate(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=new_tokens, do_sample=False)

        ids = torch.tensor([[0, 0, 1, 84, 104], [1, 101, 32, 99, 97]])
        mask = (ids != 0).long()
        expected = local_generate(ids, mask, 10)
        assert not torch.equal(expected, reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, 5:])
        if mode == "deep_ptune":  # the deep prompts matter
            assert not torch.equal(expected, local_generate(ids, mask, 10, deep_prompts=None))
        with model.inference_session(max_length=40):
            output = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
            assert torch.equal(output[:, 5:], expected)
            longer = torch.cat([output, torch.tensor([[33], [34]])], dim=1)
            longer_mask = torch.cat([mask, torch.ones(2, longer.shape[1] - 5, dtype=torch.long)], dim=1)
            again = model.generate(longer, attention_mask=longer_mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(again[:, longer.shape[1] :], local_generate(longer, longer_mask, 4))
    finally:
        model.close()


def test_a_sequence_above_the_message_limit_goes_in_chunks(tiny_llama, bootstrap, reference):
    """One row of 2500 tokens (640 KB of activations; with its gradient 1.3 MB) through a peer and a client
    limited to 1 MB messages: requests and responses travel as chunk streams; results equal local autograd."""
    (peer,) = start_peers(tiny_llama, bootstrap, ["0:4"], "--max-message-mb", "1")
    model = swarm_model(tiny_llama, bootstrap, (peer.peer_id,), max_message_bytes=2**20)
    try:
        hidden = torch.randn(1, 2500, 64, generator=torch.Generator().manual_seed(3))
        assert_blocks_match_local(model, reference, hidden)

        stub = model.remote.connections.stub(model.remote.view.chain(purpose="training")[0].peer)
        with pytest.raises(grpc.RpcError, match="do not form a ForwardRequest") as error:
            list(stub.ForwardChunked(iter([pb.Chunk(data=b"\xff" * 1000)])))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError, match="exceeds the limit"):
            list(stub.ForwardChunked(pb.Chunk(data=bytes(2**19)) for _ in range(40)))
    finally:
        model.close()
        peer.process.stop()

"""Checkpoints in fp32/fp16/bf16, sharded or single-file safetensors, or legacy .bin, all serve the same tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config

FORMATS = {
    "fp16-sharded-safetensors": dict(dtype=torch.float16, max_shard_size="100KB"),
    "bf16-single-safetensors": dict(dtype=torch.bfloat16),
    "fp32-bin": dict(dtype=torch.float32, safe_serialization=False),
}


def save(path, dtype, max_shard_size=None, safe_serialization=True, seed=0) -> str:
    save_random_checkpoint(path, tiny_llama_config(), seed=seed, max_shard_size=max_shard_size, dtype=dtype)
    if not safe_serialization:  # the same weights as a legacy pickled state dict
        torch.save(LlamaForCausalLM.from_pretrained(path).state_dict(), path / "pytorch_model.bin")
        for file in path.glob("model*.safetensors*"):
            file.unlink()
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_serves_local_tokens(name, tmp_path, served):
    path = save(tmp_path / name, **FORMATS[name])
    dtype = FORMATS[name]["dtype"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    assert reference.dtype == dtype
    with served(path, ["0:3", "3:4"]) as model:  # peers serve with --dtype auto: the checkpoint's
        assert model.dtype == dtype
        assert {hop.peer.record.dtype for hop in model.remote.view.chain()} == {str(dtype).removeprefix("torch.")}
        input_ids = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119]])
        expected = reference.generate(input_ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=12, do_sample=False), expected)


def test_model_prefix_follows_weights_not_layout(tmp_path):
    sharded = save(tmp_path / "a", torch.float32, max_shard_size="100KB")
    single = save(tmp_path / "b", torch.float32)
    pickled = save(tmp_path / "c", torch.float32, safe_serialization=False)
    other = save(tmp_path / "d", torch.float32, seed=1)
    prefixes = {name: Checkpoint(path).model_prefix() for name, path in [("a", sharded), ("b", single), ("c", pickled), ("d", other)]}
    assert prefixes["a"] == prefixes["b"] == prefixes["c"] != prefixes["d"]
    assert prefixes["a"].startswith("llama-")


def test_folder_without_weights_is_explained(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no weights: expected one of model.safetensors.index.json"):
        Checkpoint(tmp_path)

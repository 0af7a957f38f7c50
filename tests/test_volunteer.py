"""What `volunteer join` decides before it serves: sizes, how many blocks fit, which local folder holds the weights."""

import pytest
import torch
from transformers import LlamaForCausalLM

from peer.model_finder import ModelNotFoundError, choose_model, find_checkpoint
from peer.resources import DoesNotFitError, block_bytes, blocks_that_fit, cache_bytes_per_token
from peer.volunteer import parse_size
from swarm.checkpoint import Checkpoint
from swarm.checkpoint_maker import save_random_checkpoint, tiny_llama_config
from swarm.dht_records import ModelEntry


def test_parse_size():
    assert [parse_size(None, None, text) for text in ("8GB", "512MiB", "1.5g", "1000", "2 GiB")] == [
        8 * 10**9, 512 * 2**20, 15 * 10**8, 1000, 2 * 2**30,
    ]
    with pytest.raises(Exception, match="no memory size"):
        parse_size(None, None, "lots")


def test_blocks_that_fit_leave_room_for_the_cache(tiny_llama):
    checkpoint = Checkpoint(tiny_llama)
    weights = block_bytes(checkpoint, torch.float32)
    layer = LlamaForCausalLM.from_pretrained(tiny_llama).model.layers[0]
    assert weights == sum(tensor.numel() for tensor in layer.parameters()) * 4
    per_block = weights + 1000 * cache_bytes_per_token(checkpoint.config, torch.float32)
    assert cache_bytes_per_token(checkpoint.config, torch.float32) == 2 * 2 * 16 * 4  # k and v, 2 kv heads of 16
    assert blocks_that_fit(checkpoint, torch.float32, int(2.5 * per_block), 1000) == 2
    assert blocks_that_fit(checkpoint, torch.float32, 100 * per_block, 1000) == 4  # never more than the model has
    with pytest.raises(DoesNotFitError, match="one block of .* needs .* but only .* may be used"):
        blocks_that_fit(checkpoint, torch.float32, per_block - 1, 1000)


def test_the_weights_are_found_by_fingerprint_and_the_search_is_explained(tiny_llama, tmp_path):
    wanted = ModelEntry(Checkpoint(tiny_llama).model_prefix(), "tiny", "llama", 4)
    models_dir = tmp_path / "models"
    save_random_checkpoint(models_dir / "tiny", tiny_llama_config(), seed=99)  # same name, other weights
    with pytest.raises(ModelNotFoundError) as error:
        find_checkpoint(wanted, None, models_dir)
    assert f"{models_dir / 'tiny'}: other weights" in str(error.value)
    assert f"put the checkpoint folder at {models_dir / 'tiny'}" in str(error.value)
    assert find_checkpoint(wanted, tiny_llama, models_dir).path == Checkpoint(tiny_llama).path  # the folder given


def test_choosing_a_model():
    with pytest.raises(ModelNotFoundError, match="announces no model yet"):
        choose_model(None, [], None)
    with pytest.raises(ModelNotFoundError, match="no model called 'nope'"):
        choose_model(None, [ModelEntry("llama-1", "a", "llama", 4)], "nope")

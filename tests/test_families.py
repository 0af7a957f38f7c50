"""Every supported family, served by 2 peers splitting the blocks unevenly, matches local transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from swarm.errors import UnsupportedModelError
from swarm.families import ADAPTED_FAMILIES, TESTED_FAMILIES, family_for

COMMON = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
GQA = dict(num_key_value_heads=2)
CONFIGS = {
    "llama": dict(GQA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(GQA, sliding_window=6),
    "qwen2": dict(GQA, use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "qwen3": dict(GQA, head_dim=16),
    "mixtral": dict(GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "gemma2": dict(GQA, head_dim=16, sliding_window=6, tie_word_embeddings=True),
    "gemma3_text": dict(GQA, head_dim=16, sliding_window=6, tie_word_embeddings=True),
    "phi3": dict(GQA),
    "olmo2": dict(GQA),
    "gpt_neox": dict(),
    "falcon": dict(),
    "falcon-alibi": dict(alibi=True),
    "bloom": dict(),
    "gpt2": dict(tie_word_embeddings=True),
    # Not named anywhere in the code: proves a standard family needs no family code.
    "starcoder2": dict(GQA, sliding_window=6),
}


def make_checkpoint(path, name: str) -> str:
    model_type = name.split("-")[0]
    config = CONFIG_MAPPING[model_type](**{**COMMON, **CONFIGS[name]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than HF's init, so that a tiny random model's tokens are not near-ties
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 0.2)
    model.save_pretrained(path, max_shard_size="200KB")
    return str(path)


def test_every_tested_family_has_a_config_here():
    assert set(TESTED_FAMILIES) <= {name.split("-")[0] for name in CONFIGS}
    assert "starcoder2" not in TESTED_FAMILIES and "starcoder2" not in ADAPTED_FAMILIES


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_family_matches_local_transformers(name, tmp_path, served):
    path = make_checkpoint(tmp_path / name, name)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    with served(path, ["0:1", "1:4"]) as model:
        assert [(hop.start, hop.end) for hop in model.remote.view.chain()] == [(0, 1), (1, 4)]
        input_ids = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 12, 3]])
        with torch.no_grad():
            expected_logits = reference(input_ids).logits
        assert torch.allclose(model(input_ids).logits, expected_logits, atol=1e-4, rtol=0)
        expected = reference.generate(input_ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=12, do_sample=False), expected)


def test_unsupported_family_is_named(tmp_path):
    config = CONFIG_MAPPING["t5"]()
    with pytest.raises(UnsupportedModelError, match="'t5' is not a decoder-only causal LM.*families tested.*llama"):
        family_for(config)

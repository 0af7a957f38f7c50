"""Model families: how to build, feed and name the blocks of a decoder-only `transformers` architecture.

A family that follows the standard decoder-layer interface of today's `transformers` (Llama, Mistral, Qwen2/3,
Phi-3, OLMo 2, Gemma 2/3, GPT-NeoX and their many relatives) needs no code here: its classes are found from
`config.model_type`, and the per-layer inputs (attention masks by layer type, sliding windows, rotary embeddings,
per-layer-type rotary) are computed the way its base model computes them. A family that does not follow that
interface is a small subclass of `Family` overriding only what differs.
"""

import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
_MASK_FUNCTIONS = {FULL_ATTENTION: create_causal_mask, SLIDING_ATTENTION: create_sliding_window_causal_mask}
_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


@dataclass(frozen=True)
class Family:
    """The standard decoder-only layout: `{base}.layers.N` blocks, embeddings and final norm on the base model."""

    model_type: str

    @cached_property
    def causal_lm_class(self) -> type:
        return getattr(importlib.import_module("transformers"), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type])

    @cached_property
    def modeling_module(self):
        return importlib.import_module(self.causal_lm_class.__module__)

    @cached_property
    def layer_class(self) -> type[nn.Module]:
        # `_no_split_modules` names the decoder layer class in every causal LM of `transformers`.
        return getattr(self.modeling_module, self.causal_lm_class._no_split_modules[0])

    @cached_property
    def cache_argument(self) -> str:
        """How the decoder layer names its cache argument (`past_key_values`, or `layer_past` in older families)."""
        parameters = inspect.signature(self.layer_class.forward).parameters
        return next((name for name in ("past_key_values", "layer_past") if name in parameters), "past_key_values")

    @property
    def base_prefix(self) -> str:
        return self.causal_lm_class.base_model_prefix

    @property
    def layers_prefix(self) -> str:
        """Where the blocks live in the checkpoint and in the model (`{prefix}.{index}.`)."""
        return f"{self.base_prefix}.layers"

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def make_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self.layer_class(config, index)

    def make_position_encoder(self, config: PretrainedConfig) -> nn.Module | None:
        """The module the base model uses to turn position ids into per-layer inputs (rotary embeddings)."""
        class_prefix = self.causal_lm_class.__name__.removesuffix("ForCausalLM")
        rotary_class = getattr(self.modeling_module, f"{class_prefix}RotaryEmbedding", None)
        return None if rotary_class is None else rotary_class(config=config)

    @staticmethod
    def layer_type(config: PretrainedConfig, index: int) -> str:
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return SLIDING_ATTENTION if getattr(config, "sliding_window", None) else FULL_ATTENTION

    def layer_inputs(
        self,
        config: PretrainedConfig,
        position_encoder: nn.Module | None,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None,
        layer_indices: range,
    ) -> list[dict]:
        """Keyword arguments for each layer in `layer_indices`, as the family's base model would compute them."""
        kinds = [self.layer_type(config, index) for index in layer_indices]
        masks = {
            kind: _MASK_FUNCTIONS[kind](
                config=config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
            for kind in set(kinds)
        }
        rotary = {}
        if position_encoder is not None:
            per_kind = _takes_layer_type(type(position_encoder))
            for kind in set(kinds):
                extra = (kind,) if per_kind else ()
                rotary[kind] = position_encoder(hidden_states, position_ids, *extra)
        shared = {"position_ids": position_ids, self.cache_argument: cache, "use_cache": cache is not None}
        return [
            dict(shared, attention_mask=masks[kind], **({"position_embeddings": rotary[kind]} if rotary else {}))
            for kind in kinds
        ]

    # Client side: the small parts of the model.

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return model.get_input_embeddings()(input_ids)

    def final_norm(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        base = getattr(model, self.base_prefix)
        for name in _FINAL_NORM_NAMES:
            if isinstance(getattr(base, name, None), nn.Module):
                return getattr(base, name)(hidden_states)
        raise UnsupportedModelError(f"{type(base).__name__} has no final norm named any of {_FINAL_NORM_NAMES}")

    def logits(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = model.get_output_embeddings()(hidden_states)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


class GPT2Family(Family):
    """Blocks in `transformer.h`; learned absolute positions are added to the embeddings on the client."""

    @property
    def layers_prefix(self) -> str:
        return f"{self.base_prefix}.h"

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        base = getattr(model, self.base_prefix)
        return base.wte(input_ids) + base.wpe(position_ids)


class BloomFamily(GPT2Family):
    """ALiBi: every block gets a bias built from the 2-D attention mask; embeddings have their own layer norm."""

    def layer_inputs(self, config, position_encoder, hidden_states, position_ids, attention_mask, cache, layer_indices):
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        inputs = super().layer_inputs(config, None, hidden_states, position_ids, attention_mask, cache, layer_indices)
        alibi = build_alibi_tensor(attention_mask, config.n_head, dtype=hidden_states.dtype)
        return [dict(layer, alibi=alibi) for layer in inputs]

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        base = getattr(model, self.base_prefix)
        return base.word_embeddings_layernorm(base.word_embeddings(input_ids))


class FalconFamily(GPT2Family):
    """Rotary or ALiBi (folded into a materialised float mask, as FalconModel does)."""

    def layer_inputs(self, config, position_encoder, hidden_states, position_ids, attention_mask, cache, layer_indices):
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        mask = create_causal_mask(
            config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
            past_key_values=cache, allow_is_causal_skip=False,
        )
        alibi = None
        if config.alibi:
            alibi = build_alibi_tensor(attention_mask, config.num_attention_heads, dtype=hidden_states.dtype)
            lowest = torch.finfo(hidden_states.dtype).min
            if mask.dtype == torch.bool:
                mask = torch.where(mask, torch.zeros((), dtype=hidden_states.dtype), lowest)
            alibi = alibi.reshape(hidden_states.shape[0], -1, *alibi.shape[1:])
            mask = torch.masked_fill(alibi / math.sqrt(config.hidden_size // config.num_attention_heads), mask < -1, lowest)
        layer = {
            "attention_mask": mask, "alibi": alibi, "position_ids": position_ids, "layer_past": cache,
            "use_cache": cache is not None, "position_embeddings": position_encoder(hidden_states, position_ids=position_ids),
        }
        return [layer] * len(layer_indices)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        return model.get_input_embeddings()(input_ids)


# Families whose base model does more than the standard interface; every other causal LM uses `Family`.
ADAPTED_FAMILIES: dict[str, type[Family]] = {"gpt2": GPT2Family, "bloom": BloomFamily, "falcon": FalconFamily}

# Proven by tests/test_families.py against local transformers.
TESTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2",
    "gpt_neox", "falcon", "bloom", "gpt2",
)


def family_for(config: PretrainedConfig) -> Family:
    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a decoder-only causal LM of transformers; families tested with Swarm: "
            f"{', '.join(TESTED_FAMILIES)} (other causal LMs that follow the standard decoder-layer interface work too)"
        )
    return ADAPTED_FAMILIES.get(model_type, Family)(model_type)


@functools.cache
def _takes_layer_type(encoder_class: type) -> bool:
    """Whether a rotary embedding computes per layer type (Gemma 3); asked once per class, not per pass."""
    return "layer_type" in inspect.signature(encoder_class.forward).parameters

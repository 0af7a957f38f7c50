"""Model families: how to build, feed and name the blocks of a decoder-only `transformers` architecture.

A family that follows the standard decoder-layer interface of today's `transformers` (Llama, Mistral, Qwen2 and
their many relatives) needs no code here: its classes are found from `config.model_type`. A family that does not
is a small subclass of `Family` overriding only what differs.
"""

import importlib
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """The standard decoder-only layout: `{base}.embed_tokens`, `{base}.layers.N`, `{base}.norm`, `lm_head`."""

    model_type: str

    @cached_property
    def modeling_module(self):
        return importlib.import_module(self.causal_lm_class.__module__)

    @cached_property
    def causal_lm_class(self) -> type:
        return getattr(importlib.import_module("transformers"), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type])

    @cached_property
    def layer_class(self) -> type[nn.Module]:
        # `_no_split_modules` names the decoder layer class in every causal LM of `transformers`.
        return getattr(self.modeling_module, self.causal_lm_class._no_split_modules[0])

    @property
    def base_prefix(self) -> str:
        return self.causal_lm_class.base_model_prefix

    def block_prefix(self, index: int) -> str:
        """Prefix of block `index`'s tensors in the checkpoint."""
        return f"{self.base_prefix}.layers.{index}."

    def make_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        return self.layer_class(config, index)

    def make_position_encoder(self, config: PretrainedConfig) -> nn.Module | None:
        """The module the base model uses to turn position ids into per-layer inputs (rotary embeddings)."""
        class_prefix = self.causal_lm_class.__name__.removesuffix("ForCausalLM")
        rotary_class = getattr(self.modeling_module, f"{class_prefix}RotaryEmbedding", None)
        return None if rotary_class is None else rotary_class(config=config)

    def layer_inputs(
        self,
        config: PretrainedConfig,
        position_encoder: nn.Module | None,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None,
    ) -> dict:
        """Keyword arguments for every layer of a span, as the family's base model would compute them."""
        mask = create_causal_mask(
            config=config,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        inputs = dict(attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
        if position_encoder is not None:
            inputs["position_embeddings"] = position_encoder(hidden_states, position_ids=position_ids)
        return inputs

    # Client side: the small parts of the model.

    def embed(self, base_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return base_model.embed_tokens(input_ids)

    def final_norm(self, base_model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return base_model.norm(hidden_states)


def supported_model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def family_for(config: PretrainedConfig) -> Family:
    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a decoder-only causal LM of transformers; supported: "
            + ", ".join(supported_model_types())
        )
    return Family(model_type)

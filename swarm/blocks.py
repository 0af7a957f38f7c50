"""A contiguous span of transformer blocks, run with or without a KV cache."""

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from swarm import huge_pages
from swarm.checkpoint import Checkpoint
from swarm.families import Family, family_for
from swarm.model_loading import load_parts, meta_model, meta_tensors
from swarm.quantization import (
    is_serialized_linear_weight,
    load_serialized_nf4,
    quantize_block,
    serving_quantization,
    stored_quantization,
)


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model plus what the base model computes for them (masks, rotary embeddings)."""

    def __init__(self, config: PretrainedConfig, start: int, layers: list[nn.Module], family: Family | None = None):
        super().__init__()
        self.config, self.family = config, family or family_for(config)
        self.start, self.end = start, start + len(layers)
        self.layers = nn.ModuleList(layers)
        for local_index, layer in enumerate(self.layers):
            _rebase_layer_index(layer, local_index)
        self.position_encoder = self.family.make_position_encoder(config)
        self.quantization = "none"  # how the blocks' linear layers are stored (swarm/quantization.py)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype, device: torch.device | str = "cpu",
        quantization: str = "none",
    ) -> "BlockSpan":
        """Builds blocks [start, end) from only their own tensors; the rest of the model is never materialised. With
        a `quantization` other than "none", each block is quantized as soon as it is loaded (swarm/quantization.py)."""
        quantization = serving_quantization(checkpoint.config, quantization)
        family = family_for(checkpoint.config)
        config = serving_config(checkpoint.config, family)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"blocks {start}:{end} are outside the model's 0:{config.num_hidden_layers}")
        skeleton = meta_model(family, config, end)
        layers = list(skeleton.get_submodule(family.layers_prefix)[start:end])
        prefixes = {id(layer): family.block_prefix(index) for index, layer in zip(range(start, end), layers)}
        parts = [(layer, checkpoint.names_with_prefix(prefixes[id(layer)])) for layer in layers]
        parts, finish = _block_loading(checkpoint, parts, prefixes, quantization, dtype, device)
        load_parts(skeleton, family, parts, checkpoint, dtype, device, progress=f"loading blocks {start}:{end}", finish=finish)
        missing = [name for layer in layers for name in meta_tensors(layer)]
        if missing:
            raise ValueError(f"checkpoint {checkpoint.path} lacks tensors of blocks {start}:{end}: {missing[:5]}")
        span = cls(config, start, layers, family).to(device)
        span.quantization = quantization
        huge_pages.move_parameters(span)
        return span.eval().requires_grad_(False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        blocks: slice = slice(None),
        deep_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs `self.layers[blocks]`; `attention_mask` is 2-D over every position so far (cached and new).

        `deep_prompts[k]` ([batch, prefix, hidden]) is added to the first `prefix` positions before the k-th block run.
        """
        indices = range(len(self.layers))[blocks]
        layer_inputs = self.family.layer_inputs(
            self.config, self.position_encoder, hidden_states, position_ids, attention_mask, cache,
            range(self.start + indices.start, self.start + indices.stop),
        )
        for step, (index, inputs) in enumerate(zip(indices, layer_inputs)):
            if deep_prompts is not None:
                prefix = deep_prompts.shape[2]
                hidden_states = torch.cat([hidden_states[:, :prefix] + deep_prompts[step], hidden_states[:, prefix:]], dim=1)
            output = self.layers[index](hidden_states, **inputs)
            hidden_states = output[0] if isinstance(output, tuple) else output
        return hidden_states


def _block_loading(
    checkpoint: Checkpoint, parts: list[tuple[nn.Module, list[str]]], prefixes: dict[int, str], quantization: str,
    dtype: torch.dtype, device: torch.device | str,
) -> tuple[list[tuple[nn.Module, list[str]]], Callable[[nn.Module], None] | None]:
    """Which of each block's tensors load as floats, and what finishes a block once they have: nothing (exact
    weights), quantizing it (--quant), or reading its linear layers as stored (a checkpoint quantized already)."""
    if stored_quantization(checkpoint.config) == "none":
        quantize = functools.partial(quantize_block, mode=quantization, compute_dtype=dtype)
        return parts, None if quantization == "none" else quantize
    stored = {id(layer): [name for name in names if is_serialized_linear_weight(name, layer, prefixes[id(layer)])]
              for layer, names in parts}

    def load_stored(layer: nn.Module) -> None:
        load_serialized_nf4(layer, prefixes[id(layer)], checkpoint.load(stored[id(layer)]), dtype, device)

    return [(layer, [name for name in names if name not in stored[id(layer)]]) for layer, names in parts], load_stored


def serving_config(config: PretrainedConfig, family: Family) -> PretrainedConfig:
    """The config peers run with: the attention kernel local `transformers` would pick, so results match it."""
    # Building the family's model (on meta, no blocks) runs transformers' own choice of kernel for this config.
    config._attn_implementation = meta_model(family, config, num_layers=0).config._attn_implementation
    return config


def _rebase_layer_index(layer: nn.Module, local_index: int) -> None:
    """Attention modules index the cache by their layer's global index; a span's cache holds only its own blocks.

    The layer is built with its global index first (so per-layer settings such as sliding windows are right), then
    every `layer_idx` inside it is rebased to its place in the span.
    """
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = local_index

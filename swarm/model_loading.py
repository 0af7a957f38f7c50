"""Building parts of a `transformers` model from a checkpoint without materialising the rest.

The model is built on the meta device (free), then only the tensors asked for are read and loaded through
`transformers`' own loading path, which converts legacy checkpoint layouts (e.g. per-expert MoE weights into fused
expert tensors) exactly as `from_pretrained` would.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.initialization import no_init_weights
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from swarm.checkpoint import Checkpoint
from swarm.families import Family


def meta_model(family: Family, config: PretrainedConfig, num_layers: int, model_class: type | None = None) -> nn.Module:
    """The family's causal LM (or `model_class`, a subclass of it) with `num_layers` blocks, on the meta device."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    # Initialising meta tensors computes nothing, but each init call still costs milliseconds of dispatch (0.8 s of
    # a peer's start on the benchmark model): the checkpoint's tensors replace them anyway.
    with torch.device("meta"), no_init_weights():
        return (model_class or family.causal_lm_class)(config)


def load_parts(
    model: nn.Module,
    family: Family,
    parts: list[tuple[nn.Module, list[str]]],
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: str | None = None,
    finish: Callable[[nn.Module], None] | None = None,
) -> None:
    """Loads into `model` each part's checkpoint tensors, (part, names) being the modules that will be used (their
    buffers are made on `device`); see `meta_tensors` for what the checkpoint did not provide. With `finish`, the
    parts load one after the other and `finish(part)` runs on each before the next is read (quantization: the whole
    span is never in full precision in memory at once)."""
    _cast_parameters(model, dtype)
    for part, _ in parts:
        _init_non_persistent_buffers(model, part, device)
    # transformers looks conversions up by class name: a subclass (the client's model) must use its parent's.
    conversion_model = model if type(model) is family.causal_lm_class else meta_model(family, model.config, 0)
    load_config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(conversion_model), dtype=dtype)
    groups = [parts] if finish is None else [[part] for part in parts]
    for index, group in enumerate(groups):
        names = [name for _, part_names in group for name in part_names]
        label = progress if progress is None or len(groups) == 1 else f"{progress} ({index + 1}/{len(groups)})"
        state = checkpoint.load(names, dtype=dtype, progress=label)
        with _without_transformers_progress_bar():  # ours (`progress`) already counted these tensors
            convert_and_load_state_dict_in_model(model, state, load_config)
        del state
        if finish is not None:
            for part, _ in group:
                finish(part)


@contextlib.contextmanager
def _without_transformers_progress_bar() -> Iterator[None]:
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Gives the (meta) parameters the dtype to load in, as from_pretrained(dtype=...) does: transformers loads each
    tensor in its parameter's dtype, so a model built in float32 would hold half-precision weights in float32.
    Modules the class keeps in float32 keep it; buffers (rotary frequencies) keep theirs."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not keep.intersection(name.split(".")):
            parameter.data = parameter.data.to(dtype)


def meta_tensors(part: nn.Module) -> list[str]:
    """Names of the tensors of `part` that nothing has loaded yet."""
    return [name for name, tensor in part.state_dict(keep_vars=True).items() if tensor.is_meta]


def _init_non_persistent_buffers(model: nn.Module, part: nn.Module, device: torch.device | str) -> None:
    """Buffers that checkpoints do not hold (rotary frequencies, embedding scales, causal-mask buffers) get their
    values from the model's own initialiser; parameters initialised on the way are overwritten by the checkpoint."""
    for module in part.modules():
        if module._non_persistent_buffers_set:
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)

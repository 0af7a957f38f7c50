"""What this machine can give: device, dtype, free memory, and how many blocks fit next to their KV cache."""

import psutil
import torch
from transformers import PretrainedConfig

from swarm.checkpoint import Checkpoint
from swarm.families import family_for
from swarm.model_loading import meta_model
from swarm.quantization import quantized_bytes
from swarm.tensors import DTYPE_NAMES

MEMORY_HEADROOM = 0.8  # of the free memory, the rest left to activations, the allocator and the rest of the machine


def detect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """Half precision where the hardware computes it fast; float32 on CPUs (half is slow there, not smaller work)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def free_memory(device: str) -> int:
    """Bytes free now on `device` (for a CPU, the memory available to new processes)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    return psutil.virtual_memory().available


def block_bytes(checkpoint: Checkpoint, dtype: torch.dtype, quantization: str = "none") -> int:
    """Weights of the largest block in `dtype` and `quantization`, counted on a meta-device model (nothing is read
    or allocated)."""
    config = checkpoint.config
    family = family_for(config)
    layers = meta_model(family, config, config.num_hidden_layers).get_submodule(family.layers_prefix)
    return max(quantized_bytes(layer, quantization, dtype) for layer in layers)


def cache_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Keys and values one token leaves in one block's KV cache."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * dtype.itemsize


class DoesNotFitError(Exception):
    pass


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def blocks_that_fit(
    checkpoint: Checkpoint, dtype: torch.dtype, budget_bytes: int, cache_tokens: int, quantization: str = "none"
) -> int:
    """How many blocks, each with `cache_tokens` of KV cache (kept in `dtype` whatever the weights' quantization),
    fit in `budget_bytes` (at most the whole model)."""
    per_block = block_bytes(checkpoint, dtype, quantization) + cache_tokens * cache_bytes_per_token(checkpoint.config, dtype)
    count = min(budget_bytes // per_block, checkpoint.config.num_hidden_layers)
    if count < 1:
        stored = "" if quantization == "none" else f" with {quantization} weights"
        raise DoesNotFitError(
            f"one block of {checkpoint.path.name} with {cache_tokens} tokens of cache needs {human_bytes(per_block)} "
            f"in {DTYPE_NAMES[dtype]}{stored}, but only {human_bytes(budget_bytes)} may be used; free memory, raise "
            "--max-memory or lower --cache-tokens"
        )
    return int(count)

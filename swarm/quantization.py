"""Quantized blocks: the linear layers of a span kept in 8 or 4 bits, quantized block by block as they load.

Each mode uses the library that measured best for it on CPU (bench/quantization.py), with the same calls that
`transformers` makes when it loads a model with the matching config (`transformers_config`), so that a swarm of
quantized peers computes what local `transformers` computes with that config:
- "none": the checkpoint's floating-point weights;
- "int8": int8 weights with one scale per output channel, activations in the peer's dtype (torchao's
  Int8WeightOnlyConfig; bitsandbytes' LLM.int8 ran at half of float32's decode speed on CPU);
- "nf4": 4-bit NormalFloat in blocks of 64 weights, computing in the peer's dtype (bitsandbytes' Linear4bit, as
  QLoRA and Petals use), without bitsandbytes' CPU repacking (`without_cpu_repacking`).
A checkpoint that is quantized already is served as it is stored: bitsandbytes' serialized NF4 (what
`save_pretrained` writes for a model loaded with `load_in_4bit`), read tensor by tensor like any other
(`stored_quantization`, `load_serialized_nf4`).

Every `nn.Linear` of a block is quantized, as `transformers`' quantizers do; norms, biases and anything that is not
a linear layer (e.g. fused MoE expert tensors) stay in the peer's dtype. Gradients flow through the quantized
layers to their inputs (the weights stay frozen), so prompts and LoRA train on a quantized swarm.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn

from swarm.constants import QUANTIZATIONS
from swarm.logs import quiet_imports

NF4_BLOCK = 64  # weights per absmax scale in bitsandbytes' 4-bit formats (its default)


def check_quantization(mode: str) -> str:
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {mode!r}")
    return mode


def stored_quantization(config) -> str:
    """How a checkpoint's weights are stored: "none" (floats) or "nf4" (bitsandbytes' serialized 4-bit NF4, single
    quantization); ValueError for a quantized format peers cannot serve."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return "none"
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    if (stored.get("quant_method") == "bitsandbytes" and stored.get("load_in_4bit")
            and stored.get("bnb_4bit_quant_type") == "nf4" and not stored.get("bnb_4bit_use_double_quant")):
        return "nf4"
    raise ValueError(f"the checkpoint is quantized as {stored.get('quant_method')} "
                     f"({ {key: value for key, value in stored.items() if not key.startswith('_')} }): peers serve float "
                     "checkpoints and bitsandbytes' 4-bit NF4 ones")


def serving_quantization(config, requested: str) -> str:
    """The quantization a peer serves a checkpoint with: `requested` (--quant) for a float checkpoint, the stored
    one for a quantized checkpoint (which cannot be quantized otherwise)."""
    check_quantization(requested)
    stored = stored_quantization(config)
    if stored != "none" and requested not in ("none", stored):
        raise ValueError(f"the checkpoint is stored in {stored}: it cannot be served with --quant {requested}")
    return stored if stored != "none" else requested


def is_serialized_linear_weight(name: str, block: nn.Module, block_prefix: str) -> bool:
    """Whether checkpoint tensor `name` of a serialized-NF4 block is a linear layer's packed weight or one of its
    quantization statistics (`weight.absmax`, `weight.quant_map`, ...), which `load_serialized_nf4` reads."""
    module_path, found, _ = name[len(block_prefix):].partition(".weight")
    if not found:
        return False
    try:
        return type(block.get_submodule(module_path)) is nn.Linear
    except AttributeError:
        return False


def load_serialized_nf4(block: nn.Module, block_prefix: str, tensors: dict[str, torch.Tensor],
                        compute_dtype: torch.dtype, device: torch.device | str) -> None:
    """Replaces each linear layer of `block` by the NF4 layer its checkpoint tensors (`tensors`, named from the
    model's root, `block_prefix` being the block's) describe."""
    with quiet_imports():
        import bitsandbytes as bnb
    for name, module in list(block.named_modules()):
        if type(module) is not nn.Linear:
            continue
        weight = f"{block_prefix}{name}.weight"
        stats = {key[len(weight) + 1 :]: value for key, value in tensors.items() if key.startswith(weight + ".")}
        stored = functools.partial(bnb.nn.Params4bit.from_prequantized, tensors[weight], stats, device=device)
        block.set_submodule(name, _nf4_linear(module, compute_dtype, lambda layer: stored(module=layer)))


def quantize_block(block: nn.Module, mode: str, compute_dtype: torch.dtype) -> None:
    """Replaces the weights of every linear layer in `block` (loaded, in `compute_dtype`) by their quantized form."""
    if mode == "int8":
        with quiet_imports():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        quantize_(block, Int8WeightOnlyConfig())
    elif mode == "nf4":
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                block.set_submodule(name, _nf4_linear(module, compute_dtype, functools.partial(_quantized_nf4, module)))
    elif mode != "none":
        check_quantization(mode)


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, weight: Callable[[nn.Module], nn.Parameter]) -> nn.Module:
    """What transformers' bitsandbytes integration makes of `linear` for load_in_4bit with nf4 (single quantization:
    its default), built the same way; `weight(layer)` gives the new layer its 4-bit weight."""
    with quiet_imports():
        import bitsandbytes as bnb
    with torch.device("meta"):
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
            compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8,
        )
    quantized.weight = weight(quantized)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return without_cpu_repacking(quantized).requires_grad_(False)


def _quantized_nf4(linear: nn.Linear, layer: nn.Module) -> nn.Parameter:
    """`linear`'s float weight quantized for `layer` (an empty `_nf4_linear`), as transformers quantizes it."""
    with quiet_imports():
        import bitsandbytes as bnb
    return bnb.nn.Params4bit(linear.weight.data, requires_grad=False, **layer.weight.__dict__).to(linear.weight.device)


def without_cpu_repacking(module: nn.Module) -> nn.Module:
    """Turns off bitsandbytes' fast path for CPUs with AVX512-BF16 in every 4-bit linear layer of `module`.

    On such CPUs, bitsandbytes 0.50 repacks a layer's weights in place at its first call without gradients: from
    then on it computes in bfloat16 with bfloat16 scales, and calls with gradients come out wrong (measured: a
    relative error of 1.0 in the input gradient). A peer answers inference and training from the same weights, so
    it keeps the format every device shares; a local reference must do the same to compute what peers compute.
    """
    with quiet_imports():
        import bitsandbytes as bnb
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return module


def transformers_config(mode: str, dtype: torch.dtype):
    """The `quantization_config` with which local `transformers.from_pretrained(..., dtype=dtype)` quantizes a
    model exactly as peers with `mode` quantize their blocks (the reference tests and benchmarks compare with);
    None for "none"."""
    check_quantization(mode)
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if mode == "int8":
        with quiet_imports():
            from torchao.quantization import Int8WeightOnlyConfig
        return TorchAoConfig(Int8WeightOnlyConfig())
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def local_reference(path: str, mode: str, dtype: torch.dtype = torch.float32, device_map: str = "cpu") -> nn.Module:
    """The checkpoint in local `transformers`, quantized as peers with `mode` quantize their blocks (and, like them,
    without bitsandbytes' CPU repacking): what tests and benchmarks compare a quantized swarm with."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, quantization_config=transformers_config(mode, dtype)
    )
    return without_cpu_repacking(model.eval())


def quantized_bytes(block: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Memory of an unquantized `block`'s weights once quantized with `mode`, from shapes alone (a meta block will
    do)."""
    check_quantization(mode)
    total = 0
    for module in block.modules():
        for name, parameter in module.named_parameters(recurse=False):
            numel = parameter.numel()
            if mode != "none" and type(module) is nn.Linear and name == "weight":
                if mode == "int8":  # int8 values, a scale and a zero point per output row
                    total += numel + module.out_features * (dtype.itemsize + 1)
                else:  # two weights a byte, a float32 absmax per block of weights, the 16 values of the code
                    total += numel // 2 + -(-numel // NF4_BLOCK) * 4 + 16 * 4
            else:
                total += numel * dtype.itemsize
    return total


def stored_bytes(module: nn.Module) -> int:
    """Bytes that `module`'s parameters and buffers really hold, quantized tensors (tensor subclasses and
    bitsandbytes' quantization state) included."""
    return sum(_tensor_bytes(tensor) for tensor in [*module.parameters(), *module.buffers()])


def plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or the inner tensors of a tensor subclass (torchao's
    quantized weights: int8 values and their scales), which has no storage of its own."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [part for name in names for part in plain_parts(getattr(tensor, name))]
    return [tensor]


def _tensor_bytes(tensor: torch.Tensor) -> int:
    total = sum(part.numel() * part.element_size() for part in plain_parts(tensor))
    state = getattr(tensor, "quant_state", None)  # bitsandbytes' 4-bit weights: absmax scales and the code book
    if state is not None:
        total += _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
    return total

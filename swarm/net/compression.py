"""Activation compression on the wire, chosen by the client per session or call.

A compressed pb.Tensor keeps its logical dtype (what the receiver computes in) and names its codec:
- "float16" / "bfloat16": the values cast to 16 bits (half the bytes of float32; lossless for a model in that dtype);
- "int8": blockwise absmax quantization, 64 values per block with a float32 scale each (~1.06 bytes a value).
hivemind's 8-bit codecs were the first choice, but its UNIFORM_8BIT/QUANTILE_8BIT fail to decode under numpy 2
(`np.frombuffer(...)` to int) and its BLOCKWISE_8BIT needs bitsandbytes; this is the same scheme as the latter.
"""

import math

import torch

CODECS = ("float16", "bfloat16", "int8")
BLOCK = 64
_CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """The bytes are not what the codec makes for that shape."""


def check_codec(name: str) -> str:
    """The wire codec for a user's compression option ("none" or "" for none)."""
    if name in ("", "none"):
        return ""
    if name not in CODECS:
        raise ValueError(f"compression must be none, {', '.join(CODECS)}; got {name!r}")
    return name


def compress(tensor: torch.Tensor, codec: str) -> bytes:
    """The tensor's values as `codec` sends them (a contiguous CPU floating tensor)."""
    if codec in _CASTS:
        cast = tensor.to(_CASTS[codec])
        return cast.view(torch.int16).numpy().tobytes()
    flat = tensor.float().flatten()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    quantized = torch.round(blocks / scales[:, None]).to(torch.int8).flatten()[: flat.numel()]
    return quantized.numpy().tobytes() + scales.numpy().tobytes()


def decompress(data: bytes, shape: tuple[int, ...], dtype: torch.dtype, codec: str) -> torch.Tensor:
    numel = math.prod(shape)
    if codec in _CASTS:
        if len(data) != 2 * numel:
            raise CodecError(f"{codec} tensor of shape {shape} needs {2 * numel} bytes, got {len(data)}")
        values = torch.frombuffer(bytearray(data), dtype=torch.int16).view(_CASTS[codec]) if numel else torch.empty(0)
        return values.to(dtype).view(shape)
    if codec != "int8":
        raise CodecError(f"unknown codec {codec!r}; expected one of {CODECS}")
    num_blocks = -(-numel // BLOCK)
    if len(data) != numel + 4 * num_blocks:
        raise CodecError(f"int8 tensor of shape {shape} needs {numel + 4 * num_blocks} bytes, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    quantized = torch.frombuffer(bytearray(data[:numel]), dtype=torch.int8).float()
    scales = torch.frombuffer(bytearray(data[numel:]), dtype=torch.float32)
    if not torch.isfinite(scales).all():
        raise CodecError("int8 tensor with non-finite scales")
    padded = torch.nn.functional.pad(quantized, (0, -numel % BLOCK)).view(-1, BLOCK)
    return (padded * scales[:, None]).flatten()[:numel].to(dtype).view(shape)

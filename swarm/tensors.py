"""Tensors on the wire: raw bytes (or compressed ones) plus shape and dtype, decoded without a copy where torch allows."""

import hashlib
import math
import warnings

import torch

from swarm.net import compression
from swarm.wire import swarm_peer_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ELEMENT_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}

warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorDecodeError(ValueError):
    """The bytes do not make the tensor they claim to be."""


def encode(tensor: torch.Tensor, codec: str = "") -> pb.Tensor:
    """The tensor as a message: raw bytes, or compressed by `codec` (see swarm.net.compression) if it is a float."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
    tensor = tensor.contiguous()
    if codec and tensor.is_floating_point():
        data = compression.compress(tensor, codec)
        return pb.Tensor(data=data, shape=list(tensor.shape), dtype=DTYPE_NAMES[tensor.dtype], codec=codec)
    # bfloat16 has no numpy twin: reinterpret its bytes as int16 before taking them.
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return pb.Tensor(data=raw.numpy().tobytes(), shape=list(tensor.shape), dtype=DTYPE_NAMES[tensor.dtype])


def decode(message: pb.Tensor) -> torch.Tensor:
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unknown dtype {message.dtype!r}; expected one of {sorted(DTYPES)}")
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"negative dimension in shape {shape}")
    if message.codec:
        if not dtype.is_floating_point:
            raise TensorDecodeError(f"codec {message.codec!r} on a {message.dtype} tensor")
        try:
            return compression.decompress(message.data, shape, dtype, message.codec)
        except compression.CodecError as error:
            raise TensorDecodeError(str(error)) from None
    expected_bytes = math.prod(shape) * _ELEMENT_SIZES[message.dtype]
    if len(message.data) != expected_bytes:
        raise TensorDecodeError(
            f"tensor of shape {shape} and dtype {message.dtype} needs {expected_bytes} bytes, got {len(message.data)}"
        )
    if expected_bytes == 0:
        return torch.empty(shape, dtype=dtype)
    # frombuffer shares the message's (immutable) bytes instead of copying them; callers must not write into the
    # result, and torch's warning about that is expected (silenced above).
    return torch.frombuffer(message.data, dtype=dtype).view(shape)


def is_set(message: pb.Tensor) -> bool:
    return bool(message.dtype)


def digest(tensor: torch.Tensor) -> bytes:
    """A short hash of a tensor's dtype, shape and values: what a peer says it was pushed, for the client to compare
    with what the peer before it answered."""
    data = tensor.detach().cpu().contiguous()
    hasher = hashlib.blake2b(f"{data.dtype}{list(data.shape)}".encode(), digest_size=16)
    hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.digest()

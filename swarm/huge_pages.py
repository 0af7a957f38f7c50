"""CPU tensors in anonymous memory backed by transparent huge pages (Linux; elsewhere tensors stay as they are).

Weights loaded from safetensors are views of the checkpoint file: private file mappings in 4 KiB pages. A decode
step streams every weight once, so it walks a new 4 KiB page every 1024 floats; after the process has been idle
(a peer waits for the other hops of the chain) those page walks miss every cache. Measured on the 2-vCPU VM of the
benchmarks, a 4-block pass of the 118M model after 15 ms idle: 13.9-14.1 ms from the file mapping, 12.5-12.6 ms from
huge pages (`bench/`'s decode gained accordingly). Anonymous memory also detaches the weights from the file, so a
checkpoint rewritten while a peer serves cannot change them. Pages are committed only when first written, so an
arena that is not filled yet (a KV pool) costs no memory.
"""

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGNMENT = 64  # bytes: every tensor starts on a cache line


def supported() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own huge-page mapping (or `torch.empty` where huge pages are unsupported)."""
    if not supported():
        return torch.empty(shape, dtype=dtype)
    size = torch.Size(shape).numel() * dtype.itemsize
    return _arena(size)[:size].view(dtype).view(shape)


def move_parameters(module: nn.Module) -> None:
    """Copies every plain CPU parameter of `module` into one huge-page arena (tied parameters stay tied); quantized
    weights (tensor subclasses, with state of their own) stay where their library put them."""
    if not supported():
        return
    parameters = [parameter for parameter in module.parameters()
                  if parameter.device.type == "cpu" and type(parameter) is nn.Parameter]
    offsets, total = [], 0
    for parameter in parameters:
        offsets.append(total)
        total += -(-parameter.nbytes // _ALIGNMENT) * _ALIGNMENT
    if total == 0:
        return
    arena = _arena(total)
    for parameter, offset in zip(parameters, offsets):
        target = arena[offset : offset + parameter.nbytes].view(parameter.dtype).view(parameter.shape)
        target.copy_(parameter.data)
        parameter.data = target


def _arena(size: int) -> torch.Tensor:
    """`size` bytes as a uint8 tensor starting on a huge-page boundary of an anonymous private mapping."""
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor's storage keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + size]

"""Client-owned LoRA on this peer's frozen blocks: the factors come with each request and are applied by hooks."""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from swarm.blocks import BlockSpan


@contextlib.contextmanager
def lora_applied(span: BlockSpan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> Iterator[None]:
    """While inside, each named linear computes `W x + scaling * B (A x)`, as peft's LoRA layer does (no dropout).

    `factors` maps "{block}.{module path}" to (A [rank, in], B [out, rank]); names are checked by `lora_targets`.
    Only the compute thread runs blocks, so the hooks cannot leak into another request.
    """
    handles = []
    try:
        for name, (lora_a, lora_b) in factors.items():
            module = lora_target(span, name)

            def add_lora(_module, args, output, lora_a=lora_a, lora_b=lora_b):
                return output + scaling * F.linear(F.linear(args[0], lora_a), lora_b)

            handles.append(module.register_forward_hook(add_lora))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def loras_applied(span: BlockSpan, *loras: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]) -> Iterator[None]:
    """Several LoRAs at once (a hosted adapter and the client's own): their updates add up."""
    with contextlib.ExitStack() as stack:
        for factors, scaling in loras:
            stack.enter_context(lora_applied(span, factors, scaling))
        yield


def lora_target(span: BlockSpan, name: str) -> nn.Linear:
    """The linear named "{block}.{module path}" in the span; ValueError if there is none."""
    block_text, _, module_path = name.partition(".")
    if not block_text.isdigit() or not span.start <= int(block_text) < span.end:
        raise ValueError(f"LoRA target {name!r} is not in blocks {span.start}:{span.end}")
    try:
        module = span.layers[int(block_text) - span.start].get_submodule(module_path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"LoRA target {name!r} is not a linear layer of block {block_text}")
    return module

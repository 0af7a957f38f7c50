"""LoRA adapters a peer hosts (`--adapters PATH`): read with peft, kept for this peer's blocks, chosen by name.

A hosted adapter is applied like client-owned LoRA (`lora.lora_applied`), with each module's scaling folded into
its B factor (peft allows a scaling per module), and it is never trained: requests get no gradient for it.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peer.lora import lora_target
from swarm.blocks import BlockSpan

if TYPE_CHECKING:
    from peft import LoraConfig

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


class AdapterError(ValueError):
    pass


@dataclass(frozen=True)
class HostedAdapter:
    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "{block}.{module path}" -> (A, scaling * B)


def adapter_lora(adapter: HostedAdapter | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The adapter as `loras_applied` takes it (its scalings are folded in)."""
    return (adapter.factors if adapter else {}), 1.0


def parse_adapter_option(option: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named after its folder)."""
    name, separator, path = option.partition("=")
    return (name, Path(path)) if separator else (Path(option).name, Path(option))


def load_adapter(name: str, path: Path, span: BlockSpan, layers_prefix: str, dtype: torch.dtype) -> HostedAdapter:
    """The adapter's factors for the span's blocks, checked against its linears."""
    from peft import LoraConfig, PeftConfig  # here: importing peft costs a peer without adapters 1.5 s of start-up
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(str(path))
        weights = load_peft_weights(str(path), device="cpu")
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read the peft adapter at {path}: {error}") from None
    if not isinstance(config, LoraConfig) or getattr(config, "use_dora", False):
        raise AdapterError(f"{path} is a {type(config).__name__}{' (DoRA)' if isinstance(config, LoraConfig) else ''}; "
                           "peers host plain LoRA adapters")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        block = re.match(rf"^{re.escape(layers_prefix)}\.(\d+)\.(.+)$", match.group("module")) if match else None
        if block is None:
            raise AdapterError(f"{path}: {key!r} is not a LoRA factor of a transformer block (peers hold only blocks)")
        pairs.setdefault(f"{int(block.group(1))}.{block.group(2)}", {})[match.group("kind")] = tensor
    factors = {}
    for target, pair in pairs.items():
        if not span.start <= int(target.split(".")[0]) < span.end:
            continue
        try:
            module = lora_target(span, target)
        except ValueError as error:
            raise AdapterError(f"{path}: {error}") from None
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        if list(lora_a.shape) != [lora_a.shape[0], module.in_features] or list(lora_b.shape) != [module.out_features, lora_a.shape[0]]:
            raise AdapterError(f"{path}: the factors of {target} do not fit its {module.in_features}->{module.out_features} linear")
        device = module.weight.device
        scaling = _scaling(config, target, rank=lora_a.shape[0])
        factors[target] = (lora_a.to(device, dtype), (lora_b * scaling).to(device, dtype))
    return HostedAdapter(name, factors)


def _scaling(config: "LoraConfig", target: str, rank: int) -> float:
    """peft's scaling of one module: lora_alpha (or its alpha_pattern entry) over rank (or sqrt(rank), rsLoRA)."""
    module_path = target.partition(".")[2]
    alpha = next(
        (value for pattern, value in (config.alpha_pattern or {}).items() if re.match(rf"(.*\.)?{pattern}$", module_path)),
        config.lora_alpha,
    )
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)

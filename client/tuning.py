"""What a client trains on top of frozen remote blocks: prompts, deep prompts, LoRA factors (peft's naming)."""

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from swarm.families import Family
from swarm.model_loading import meta_model


class PromptTuning(nn.Module):
    """`ptune`: `num_prefix_tokens` trainable embeddings before the input; `deep_ptune`: also a trainable prompt
    added to those positions before every remote block (sent with each request, gradients come back)."""

    def __init__(self, num_prefix_tokens: int, hidden_size: int, num_blocks: int, deep: bool, dtype: torch.dtype):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_prefix_tokens, hidden_size, dtype=dtype) * 0.02)
        self.deep_prompts = nn.Parameter(torch.zeros(num_blocks, num_prefix_tokens, hidden_size, dtype=dtype)) if deep else None

    @property
    def num_prefix_tokens(self) -> int:
        return self.prompts.shape[0]

    def batch_deep_prompts(self, batch: int) -> torch.Tensor | None:
        if self.deep_prompts is None:
            return None
        return self.deep_prompts.unsqueeze(1).expand(-1, batch, -1, -1)


class RemoteLoRA(nn.Module):
    """LoRA factors for linears of the remote blocks, kept and trained on the client.

    Targets are the linears whose names end in one of `target_modules` (as in peft); factors are initialised as
    peft does (A Kaiming-uniform, B zero) and `peft_state_dict()` names them as peft saves them.
    """

    def __init__(self, family: Family, config: PretrainedConfig, rank: int, alpha: float, target_modules: list[str], dtype: torch.dtype):
        super().__init__()
        self.layers_prefix, self.rank, self.alpha, self.scaling = family.layers_prefix, rank, alpha, alpha / rank
        self.target_modules = list(target_modules)
        layer = meta_model(family, config, 1).get_submodule(family.layers_prefix)[0]
        targets = [
            (name, module) for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules
        ]
        if not targets:
            raise ValueError(f"no linear of a {family.model_type} block is named any of {target_modules}")
        self.names: list[str] = []
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        for block in range(config.num_hidden_layers):
            for name, module in targets:
                lora_a = torch.empty(rank, module.in_features, dtype=dtype)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
                self.names.append(f"{block}.{name}")
                self.lora_A.append(nn.Parameter(lora_a))
                self.lora_B.append(nn.Parameter(torch.zeros(module.out_features, rank, dtype=dtype)))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (a, b) for name, a, b in zip(self.names, self.lora_A, self.lora_B)}

    def peft_name(self, name: str, kind: str) -> str:
        block, _, path = name.partition(".")
        return f"base_model.model.{self.layers_prefix}.{block}.{path}.{kind}.weight"

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, lora_a, lora_b in zip(self.names, self.lora_A, self.lora_B):
            state[self.peft_name(name, "lora_A")] = lora_a.detach().clone()
            state[self.peft_name(name, "lora_B")] = lora_b.detach().clone()
        return state

    def save_peft(self, path: str | Path, base_model: str = "") -> Path:
        """Writes the factors as a peft adapter folder (adapter_config.json, adapter_model.safetensors), which
        `peft.PeftModel.from_pretrained` and `swarm-peer serve --adapters` read."""
        from peft import LoraConfig  # here: peft costs 1.5 s of imports, and only this needs it

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules, lora_dropout=0.0,
                            base_model_name_or_path=base_model or None)
        config.save_pretrained(str(path))
        state = {name: tensor.contiguous() for name, tensor in self.peft_state_dict().items()}
        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, lora_a, lora_b in zip(self.names, self.lora_A, self.lora_B):
                lora_a.copy_(state[self.peft_name(name, "lora_A")])
                lora_b.copy_(state[self.peft_name(name, "lora_B")])

"""Reading a local Hugging Face checkpoint one part at a time: config, a span of blocks, the client-side tensors."""

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

# Config keys that describe how a checkpoint was saved or run, not which weights it holds.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation"}


class Checkpoint:
    """A checkpoint folder on disk; tensors are read lazily, only those asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a checkpoint folder: it has no config.json")
        self.config: PretrainedConfig = AutoConfig.from_pretrained(self.path)
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        index_path = self.path / SAFETENSORS_INDEX
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / SAFETENSORS_SINGLE
        if single.is_file():
            with safe_open(single, framework="pt") as reader:
                return {name: single for name in reader.keys()}
        raise FileNotFoundError(f"{self.path} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}")

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        dtype = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None) or torch.float32
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def load(self, names: list[str], dtype: torch.dtype | None = None, progress: str | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by shard, so each shard is opened once), cast to `dtype` if given."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
            by_file[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        with tqdm(total=len(names), desc=progress, unit="tensor", disable=progress is None) as bar:
            for file, file_names in by_file.items():
                with safe_open(file, framework="pt") as reader:
                    for name in file_names:
                        tensor = reader.get_tensor(name)
                        tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                        bar.update()
        return tensors

    def fingerprint(self) -> str:
        """Identifies the weights, not the folder: config, tensor names and shapes, and a slice of every tensor.

        Peers holding the same weights in differently named folders or shard layouts agree on it; a fine-tune of the
        same architecture does not.
        """
        digest = hashlib.sha256()
        config = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name, file in self.weight_map.items():
            by_file[file].append(name)
        samples: dict[str, bytes] = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as reader:
                for name in file_names:
                    tensor_slice = reader.get_slice(name)
                    shape = tensor_slice.get_shape()
                    first_row = tensor_slice[:1] if shape else reader.get_tensor(name)
                    samples[name] = f"{shape}".encode() + first_row.float().numpy().tobytes()
        for name in sorted(samples):
            digest.update(name.encode())
            digest.update(samples[name])
        return digest.hexdigest()

    def model_prefix(self) -> str:
        """The DHT name of this model: family plus fingerprint, so peers serving different weights never mix."""
        return f"{self.config.model_type}-{self.fingerprint()[:16]}"

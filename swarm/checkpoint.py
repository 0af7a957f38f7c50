"""Reading a local Hugging Face checkpoint one part at a time: config, a span of blocks, the client-side tensors."""

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

# Checkpoint layouts, in order of preference: (index file, single file).
LAYOUTS = [
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
]

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
        for index_name, single_name in LAYOUTS:
            if (index_path := self.path / index_name).is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                return {name: self.path / file for name, file in weight_map.items()}
            if (single := self.path / single_name).is_file():
                with _open_shard(single) as reader:
                    return {name: single for name in reader.keys()}
        expected = ", ".join(name for layout in LAYOUTS for name in layout)
        raise FileNotFoundError(f"{self.path} holds no weights: expected one of {expected}")

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
                with _open_shard(file) as reader:
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
            with _open_shard(file) as reader:
                for name in file_names:
                    shape, first_row = reader.first_row(name)
                    samples[name] = f"{shape}".encode() + first_row.float().numpy().tobytes()
        for name in sorted(samples):
            digest.update(name.encode())
            digest.update(samples[name])
        return digest.hexdigest()

    def model_prefix(self) -> str:
        """The DHT name of this model: family plus fingerprint, so peers serving different weights never mix."""
        return f"{self.config.model_type}-{self.fingerprint()[:16]}"


class _SafetensorsShard:
    """Reads tensors, or only their first row, without loading the rest of the file."""

    def __init__(self, path: Path):
        self._file = safe_open(path, framework="pt")

    def __enter__(self) -> "_SafetensorsShard":
        self._reader = self._file.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.__exit__(*exc_info)

    def keys(self) -> list[str]:
        return list(self._reader.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._reader.get_tensor(name)

    def first_row(self, name: str) -> tuple[list[int], torch.Tensor]:
        tensor_slice = self._reader.get_slice(name)
        shape = list(tensor_slice.get_shape())
        return shape, (tensor_slice[:1] if shape else self._reader.get_tensor(name))


class _PickleShard:
    """A legacy `pytorch_model*.bin` shard, memory-mapped and unpickled with `weights_only` (no code runs)."""

    def __init__(self, path: Path):
        self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def __enter__(self) -> "_PickleShard":
        return self

    def __exit__(self, *exc_info) -> None:
        self._tensors = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def first_row(self, name: str) -> tuple[list[int], torch.Tensor]:
        tensor = self._tensors[name]
        return list(tensor.shape), (tensor[:1] if tensor.ndim else tensor)


def _open_shard(path: Path) -> _SafetensorsShard | _PickleShard:
    return _SafetensorsShard(path) if path.suffix == ".safetensors" else _PickleShard(path)

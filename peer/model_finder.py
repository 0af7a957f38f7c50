"""Which model a volunteer serves and where its weights are on this machine (nothing is downloaded)."""

import os
from pathlib import Path

from swarm.checkpoint import Checkpoint
from swarm.coverage import block_throughputs
from swarm.dht_records import ModelEntry, fetch_peer_spans


class ModelNotFoundError(Exception):
    pass


def models_dir() -> Path:
    return Path(os.environ.get("SWARM_MODELS_DIR", "~/.cache/swarm/models")).expanduser()


def hub_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def neediest_model(dht, models: list[ModelEntry]) -> ModelEntry:
    """The model whose weakest block has the least throughput (a gap first)."""
    def weakest(model: ModelEntry) -> float:
        return min(block_throughputs(fetch_peer_spans(dht, model.prefix, model.num_blocks), model.num_blocks))

    return min(models, key=weakest)


def choose_model(dht, models: list[ModelEntry], wanted: str | None) -> ModelEntry | None:
    """The index entry named by `wanted` (name or prefix), or the neediest one; None when `wanted` is a local
    checkpoint folder the swarm does not serve yet (this volunteer starts it)."""
    if wanted is None:
        if not models:
            raise ModelNotFoundError("the swarm announces no model yet; name a local checkpoint folder to start one")
        return neediest_model(dht, models)
    matches = [model for model in models if wanted in (model.name, model.prefix)]
    if matches:
        return neediest_model(dht, matches)
    if Path(wanted).expanduser().is_dir():
        return None
    served = ", ".join(f"{model.name} ({model.prefix})" for model in models) or "none"
    raise ModelNotFoundError(f"the swarm serves no model called {wanted!r} and it is no local folder; it serves: {served}")


def candidate_folders(model: ModelEntry, wanted: str | None, search_dir: Path) -> list[Path]:
    """Where the weights of `model` may be, in order: the folder given, the models directory, the Hub cache."""
    folders = [Path(wanted).expanduser()] if wanted and Path(wanted).expanduser().is_dir() else []
    folders.append(search_dir / model.name)
    folders.extend(sorted(hub_cache_dir().glob(f"models--*--{model.name}/snapshots/*")))
    return folders


def find_checkpoint(model: ModelEntry, wanted: str | None, search_dir: Path) -> Checkpoint:
    """The first candidate folder holding exactly the swarm's weights (same fingerprint), or an error saying
    where it looked."""
    looked = []
    for folder in candidate_folders(model, wanted, search_dir):
        try:
            checkpoint = Checkpoint(folder)
            prefix = checkpoint.model_prefix()
        except (FileNotFoundError, OSError, ValueError) as error:
            looked.append(f"  {folder}: {error}")
            continue
        if prefix == model.prefix:
            return checkpoint
        looked.append(f"  {folder}: other weights ({prefix})")
    raise ModelNotFoundError(
        f"no local copy of {model.name} ({model.prefix}) found; looked in:\n" + "\n".join(looked) + "\n"
        f"put the checkpoint folder at {search_dir / model.name} or give its path as MODEL"
    )

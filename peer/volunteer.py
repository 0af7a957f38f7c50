"""`volunteer join`: give this machine to the swarm with one command.

It finds the model the swarm serves (the DHT's model index) and its weights on this machine, picks the device,
the dtype and how many blocks fit next to their KV cache, and serves them where the swarm is weakest, moving
later if other blocks come to need it more.
"""

import logging
import re
import sys

import click

from peer.cli import SwarmCommandGroup, peer_options, run_peer, swarm_reader

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(_ctx, _param, value: str | None) -> int | None:
    """'8GB', '512MiB', '1.5g', '1000000' -> bytes (decimal units, or binary ones with an i)."""
    if value is None:
        return None
    match = _SIZE.match(value)
    if match is None:
        raise click.BadParameter(f"{value!r} is no memory size; e.g. 8GB, 512MiB")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " "))


@click.group(cls=SwarmCommandGroup)
def main() -> None:
    """Contribute this machine's compute to a Swarm."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model", required=False)
@click.option("--models-dir", type=click.Path(file_okay=False), help="Where local checkpoint folders are looked "
              "for by model name (default: $SWARM_MODELS_DIR or ~/.cache/swarm/models; the Hugging Face cache is "
              "searched too).")
@click.option("--max-memory", callback=parse_size,
              help="Use at most this much memory, e.g. 8GB (default: 80% of what is free).")
@click.option("--num-blocks", type=int, help="Serve this many blocks (default: as many as fit).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU if there is one), cpu, cuda, cuda:1...")
@peer_options
def join(model, models_dir, max_memory, num_blocks, device, **options) -> None:
    """Join the swarm and serve where it is weakest. MODEL: a model name or prefix from the swarm's index, or a
    local checkpoint folder (default: the served model that needs help most)."""
    from pathlib import Path

    from peer.model_finder import ModelNotFoundError, choose_model, find_checkpoint
    from peer.model_finder import models_dir as default_models_dir
    from peer.resources import (
        MEMORY_HEADROOM,
        DoesNotFitError,
        blocks_that_fit,
        default_dtype,
        detect_device,
        free_memory,
        human_bytes,
    )
    from swarm.checkpoint import Checkpoint
    from swarm.dht_records import fetch_models
    from swarm.quantization import serving_quantization
    from swarm.tensors import DTYPE_NAMES

    if options["new_swarm"]:
        raise click.UsageError("volunteer join joins a running swarm; start a new one with swarm-peer serve --new-swarm")
    dht = swarm_reader(options["initial_peers"])
    try:
        entry = choose_model(dht, fetch_models(dht), model)
        search_dir = Path(models_dir) if models_dir else default_models_dir()
        checkpoint = Checkpoint(model) if entry is None else find_checkpoint(entry, model, search_dir)
    except (ModelNotFoundError, FileNotFoundError) as error:  # nothing to serve: say why, no traceback
        sys.exit(f"volunteer: {error}")
    finally:
        dht.shutdown()
    device = detect_device() if device == "auto" else device
    dtype = default_dtype(device)
    try:
        quantization = serving_quantization(checkpoint.config, options["quantization"])
    except ValueError as error:
        sys.exit(f"volunteer: {error}")
    available = int(free_memory(device) * MEMORY_HEADROOM)
    budget = available if max_memory is None else min(max_memory, available)
    try:
        fit = blocks_that_fit(checkpoint, dtype, budget, options["cache_tokens"], quantization)
    except DoesNotFitError as error:
        sys.exit(f"volunteer: {error}")
    if num_blocks is not None and num_blocks > fit:
        sys.exit(f"volunteer: {num_blocks} blocks do not fit in {human_bytes(budget)}; at most {fit} do")
    total = checkpoint.config.num_hidden_layers
    chosen = min(num_blocks or fit, total)
    weights = DTYPE_NAMES[dtype] + ("" if quantization == "none" else f" with {quantization} weights")
    print(
        f"volunteering for {checkpoint.path.name} ({'new to the swarm' if entry is None else entry.prefix}): "
        f"{chosen} of {total} blocks on {device} in {weights} (room for {fit} in {human_bytes(budget)}), "
        f"weights from {checkpoint.path}",
        flush=True,
    )
    run_peer(str(checkpoint.path), None, chosen, device, DTYPE_NAMES[dtype], **options)


if __name__ == "__main__":
    main()

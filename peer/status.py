"""`swarm-peer status`: the swarm as tables in the terminal (rich), gaps in red."""

import itertools
import time

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from swarm.swarm_state import ModelView, SwarmSnapshot
from swarm.training_runs import RunProgress

HEALTH_STYLES = {"healthy": "green", "gaps": "bold red", "down": "bold red", "degraded": "bold red", "empty": "yellow"}


def block_ranges(model: ModelView) -> list[tuple[int, int, int, float]]:
    """Runs of consecutive blocks with the same coverage: (first, last, servers, tokens/s)."""
    runs = []
    coverage = zip(model.block_servers, model.block_throughputs)
    block = 0
    for (servers, throughput), run in itertools.groupby(coverage):
        length = len(list(run))
        runs.append((block, block + length - 1, servers, throughput))
        block += length
    return runs


def coverage_table(model: ModelView) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("blocks", "servers", "tokens/s"):
        table.add_column(column, justify="right")
    for first, last, servers, throughput in block_ranges(model):
        blocks = f"{first}" if first == last else f"{first}-{last}"
        if servers == 0:
            table.add_row(blocks, Text("GAP: no server", style="bold red"), "0", style="red")
        else:
            table.add_row(blocks, str(servers), f"{throughput:,.0f}")
    return table


def peers_table(model: ModelView) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("peer", "name", "blocks", "state", "tokens/s", "net tok/s", "cache left", "dtype", "quant", "ver",
                   "reached", "address", "adapters"):
        table.add_column(column, justify="right" if column in ("tokens/s", "net tok/s", "cache left") else "left",
                         no_wrap=True)
    for peer in sorted(model.peers, key=lambda peer: (peer.start, peer.peer_id)):
        blocks = f"{peer.start}:{peer.end}" + (f" -> {peer.moving_to}:" if peer.moving_to is not None else "")
        state_style = {"online": "green", "joining": "yellow", "offline": "dim"}[peer.state]
        table.add_row(
            peer.peer_id[:10], peer.public_name, blocks, Text(peer.state, style=state_style), f"{peer.throughput:,.0f}",
            f"{peer.network_throughput:,.0f}", f"{peer.cache_tokens_left:,}", peer.dtype, peer.quantization,
            peer.version, Text(peer.reachability, style="yellow" if peer.relay else ""), peer.relay or peer.address,
            ", ".join(peer.adapters),
        )
    return table


def print_model(model: ModelView, console: Console) -> None:
    gaps = model.gaps
    console.print()
    console.print(Text.assemble((model.name, "bold"), f"  {model.prefix}", style="cyan"))
    summary = Text(f"{model.model_type}, {model.num_blocks} blocks, {len(model.peers)} peer(s): ")
    summary.append(model.health, style=HEALTH_STYLES[model.health])
    if gaps:
        summary.append(f" ({len(gaps)} block(s) without a server)", style="red")
    weakest = min(model.block_throughputs, default=0.0)
    summary.append(f"; weakest block {weakest:,.0f} tokens/s")
    console.print(summary)
    console.print(coverage_table(model))
    console.print(peers_table(model))


def training_table(runs: list[RunProgress]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), title="collaborative training", title_justify="left")
    for column in ("run", "model", "epoch", "samples", "members", "samples/s", "parameters"):
        table.add_column(column, justify="left" if column in ("run", "model") else "right", no_wrap=True)
    for run in runs:
        table.add_row(run.record.name, run.record.model, str(run.epoch),
                      f"{run.samples_accumulated:,}/{run.record.target_batch_size:,}", str(run.num_peers),
                      f"{run.samples_per_second:,.1f}", f"{run.record.parameters:,}")
    return table


def print_status(snapshot: SwarmSnapshot, console: Console) -> None:
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.taken_at))
    console.print(Text.assemble(f"swarm at {taken}: {len(snapshot.models)} model(s), ",
                                (snapshot.health, HEALTH_STYLES[snapshot.health])))
    if not snapshot.models:
        console.print("no model is announced: start peers with `swarm-peer serve` or `volunteer join`")
    for model in snapshot.models:
        print_model(model, console)
    if snapshot.training:
        console.print()
        console.print(training_table(snapshot.training))

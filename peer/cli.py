"""`swarm-peer`: start a bootstrap DHT node, serve a span of a model's blocks, or look at the swarm."""

import asyncio
import functools
import logging
import os
import signal
import sys
import threading

import click

from swarm.constants import (
    DEFAULT_ACTIVATION_CACHE_MB,
    DEFAULT_ANNOUNCE_PERIOD,
    DEFAULT_BANDWIDTH_MBPS,
    DEFAULT_MAX_MESSAGE_BYTES,
    LINEAR_LAYOUTS,
    QUANTIZATIONS,
)
from swarm.errors import SwarmError
from swarm.logs import quiet_import_noise
from swarm.net.addresses import AddressError

quiet_import_noise()  # before any command imports transformers (which imports torchao when it is installed)


class SwarmCommandGroup(click.Group):
    """A mistake the user can fix (a malformed address, initial peers nobody answers at) ends any command with one
    line naming it, not a traceback; and a command that is done exits at once."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (SwarmError, AddressError) as error:
            raise click.ClickException(str(error)) from None

    # `api` runs the client side of a model (client/api/cli.py): named here, loaded only when asked for, since peer
    # code never imports client code.
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "api"])

    def get_command(self, ctx: click.Context, name: str):
        if name == "api":
            from client.api.cli import api

            return api
        return super().get_command(ctx, name)

    def main(self, *args, **kwargs):
        try:
            super().main(*args, **kwargs)
            code = 0
        except SystemExit as exit:
            code = exit.code
        if isinstance(code, str):  # sys.exit("message"): what the interpreter would have printed
            print(code, file=sys.stderr)
        # Skip the interpreter's finalisation: tearing down torch's and transformers' modules takes seconds (2.6 s on
        # a 2-core VM), which a supervisor waiting for a stopped peer would wait too. Everything of ours is stopped.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else int(code is not None))


def _parse_blocks(_ctx, _param, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        start, end = (int(part) for part in value.split(":"))
    except ValueError:
        raise click.BadParameter("expected START:END, e.g. 0:4") from None
    if not 0 <= start < end:
        raise click.BadParameter("expected 0 <= START < END")
    return start, end


_PEER_OPTIONS = [
    click.option("--initial-peers", multiple=True, help="Multiaddr of a DHT node of the swarm (repeatable)."),
    click.option("--new-swarm", is_flag=True, help="Start a new swarm instead of joining one (no --initial-peers); "
                 "others join it with the --initial-peers line this peer prints."),
    click.option("--host", help="Address the data plane and the DHT node listen on (default: every interface; "
                 "loopback when every initial peer is on loopback, a swarm on this machine)."),
    click.option("--port", default=0, show_default=True, help="Data-plane (gRPC over TLS) port (0: any free port)."),
    click.option("--dht-port", default=0, show_default=True, help="The DHT node's TCP port (0: any free port); fix "
                 "it, and --port, to forward them on a home router."),
    click.option("--announce-host", help="Address others reach this peer at (default: found out, by asking the "
                 "swarm to dial this peer back)."),
    click.option("--announce-port", type=int, help="Port others reach the data plane at (default: --port), e.g. "
                 "a router's forwarded port."),
    click.option("--relay/--no-relay", default=True, show_default=True, help="When reachable, relay for peers "
                 "behind NAT and dial back starting peers."),
    click.option("--relay-port", default=0, show_default=True, help="TCP port of the relay (0: any free port)."),
    click.option("--cache-tokens", default=8192, show_default=True, help="KV-cache pool size, in tokens of the span."),
    click.option("--announce-period", default=DEFAULT_ANNOUNCE_PERIOD, show_default=True,
                 help="Seconds between DHT announcements."),
    click.option("--session-timeout", default=300.0, show_default=True, help="Close sessions idle this many seconds."),
    click.option("--max-message-mb", default=DEFAULT_MAX_MESSAGE_BYTES // 2**20, show_default=True),
    click.option("--public-name", default="", help="A name shown to others in the swarm's status."),
    click.option("--quant", "quantization", type=click.Choice(QUANTIZATIONS), default="none", show_default=True,
                 help="Store the blocks' linear weights in 8 bits (int8: about half of bfloat16's memory) or 4 bits "
                 "(nf4: about a quarter); computation stays in --dtype. Clients may ask for exact peers only."),
    click.option("--num-threads", type=int, help="CPU threads of a large pass: prefill, batched decoding, training "
                 "(default: torch's, one per core). Peers that share a machine and compute at the same time run faster "
                 "with the cores split between them."),
    click.option("--parallel-min-rows", type=click.IntRange(min=1), help="Passes of fewer token rows than this run on "
                 "one thread (default: measured on this machine at the first start, and cached)."),
    click.option("--linear-layout", type=click.Choice(LINEAR_LAYOUTS), default="measured", show_default=True,
                 help="How linear layers multiply in passes of up to 64 rows: rows (torch's x @ W^T), columns "
                 "(W @ x^T, which some BLAS libraries compute much faster for few rows), or whichever was faster "
                 "for each pass size at the first start (cached)."),
    click.option("--activation-cache-mb", default=DEFAULT_ACTIVATION_CACHE_MB, show_default=True,
                 type=click.IntRange(min=0), help="Memory for what autograd needs from clients' training Forwards "
                 "until their Backwards (least recently kept out first; 0: every Backward recomputes its Forward)."),
    click.option("--balance-period", default=120.0, show_default=True,
                 help="Mean seconds between checks whether other blocks need this peer more (not with --blocks)."),
    click.option("--bandwidth", "bandwidth_mbps", default=DEFAULT_BANDWIDTH_MBPS, show_default=True,
                 help="This machine's network bandwidth in Mbit/s (announced as network throughput)."),
    click.option("--adapters", multiple=True, help="A peft LoRA adapter folder to host, as PATH or NAME=PATH "
                 "(repeatable); clients choose it by name (default name: the folder's)."),
    click.option("--identity-path", type=click.Path(dir_okay=False), help="File with this peer's private key "
                 "(created if missing): the peer keeps its identity across restarts (default: a new one each run)."),
]


def peer_options(command):
    """The options every serving command shares (they become PeerConfig fields, see `run_peer`)."""
    return functools.reduce(lambda decorated, option: option(decorated), reversed(_PEER_OPTIONS), command)


def run_peer(model_path: str, blocks, num_blocks: int | None, device: str, dtype: str, initial_peers, new_swarm: bool,
             host, port, dht_port, announce_host, announce_port, relay, relay_port, cache_tokens, announce_period, session_timeout,
             max_message_mb, public_name, quantization, num_threads, parallel_min_rows, linear_layout, activation_cache_mb, balance_period, bandwidth_mbps, identity_path, adapters) -> None:
    """Runs a peer until SIGINT/SIGTERM."""
    if not initial_peers and not new_swarm:
        raise click.UsageError("give --initial-peers MULTIADDR (a line `swarm-peer bootstrap` printed) to join a "
                               "swarm, or --new-swarm to start one")
    if initial_peers and new_swarm:
        raise click.UsageError("--new-swarm starts a swarm of its own: leave out --initial-peers")
    from swarm.dht_node import check_initial_peers

    check_initial_peers(list(initial_peers))  # before the model code is imported and the checkpoint loads
    import uvloop

    from peer.network import NetworkOptions
    from peer.server import Peer, PeerConfig

    network = NetworkOptions(
        initial_peers=list(initial_peers), host=host, port=port, dht_port=dht_port, announce_host=announce_host,
        announce_port=announce_port, relay=relay, relay_port=relay_port,
    )
    config = PeerConfig(
        model_path=model_path, blocks=blocks, num_blocks=num_blocks,
        device=device, dtype=dtype, network=network, cache_tokens=cache_tokens,
        announce_period=announce_period, session_idle_timeout=session_timeout,
        max_message_bytes=max_message_mb * 2**20, public_name=public_name, balance_period=balance_period,
        bandwidth_mbps=bandwidth_mbps, identity_path=identity_path, adapters=tuple(adapters), quantization=quantization,
        num_threads=num_threads,
        parallel_min_rows=parallel_min_rows, linear_layout=linear_layout, activation_cache_mb=activation_cache_mb,
    )
    try:
        peer = Peer(config)
    except (ValueError, FileNotFoundError) as error:  # a bad checkpoint folder or span: say so, no traceback
        raise click.ClickException(str(error)) from None
    uvloop.install()
    try:
        asyncio.run(peer.run())
    except ConnectionError as error:  # unreachable and no relay (a malformed address: SwarmCommandGroup)
        raise click.ClickException(str(error)) from None


@click.group(cls=SwarmCommandGroup)
def main() -> None:
    """Run a Swarm peer (a DHT bootstrap node, or a server for a span of a model's blocks), or look at the swarm."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="TCP port for the DHT (0: any free port).")
@click.option("--announce-host", help="Address others reach this node at (default: its first non-loopback one).")
@click.option("--rpc-port", default=0, show_default=True, help="Port of the dial-back service (0: any free port).")
@click.option("--relay-port", default=0, show_default=True, help="Port of the relay (0: any free port).")
@click.option("--identity-path", type=click.Path(dir_okay=False), help="File with this node's private key "
              "(created if missing).")
def bootstrap(host: str, port: int, announce_host: str | None, rpc_port: int, relay_port: int, identity_path) -> None:
    """Start a DHT node that others join with --initial-peers (prints its multiaddrs); it also tells starting
    peers whether they are reachable and relays for those behind NAT."""
    import uvloop

    from peer.bootstrap import run_bootstrap

    uvloop.install()
    asyncio.run(run_bootstrap(host, port, announce_host, rpc_port, relay_port, identity_path))
    print("bootstrap node stopped", flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def swarm_reader(initial_peers):
    """A client-mode DHT node for looking at the swarm (it stores nothing)."""
    from swarm.dht_node import swarm_dht

    if not initial_peers:
        raise click.UsageError("give --initial-peers: the multiaddr of any DHT node of the swarm")
    return swarm_dht(initial_peers=list(initial_peers), client_mode=True, start=True)[0]


@main.command()
@click.option("--initial-peers", multiple=True, help="Multiaddr of a DHT node of the swarm (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON instead of tables.")
def status(initial_peers, as_json: bool) -> None:
    """Print the swarm: models, per-block coverage and throughput (gaps in red), peers."""
    import json

    from rich.console import Console

    from peer.status import print_status
    from swarm.swarm_state import take_snapshot

    dht = swarm_reader(initial_peers)
    try:
        snapshot = take_snapshot(dht)
    finally:
        dht.shutdown()
    if as_json:
        print(json.dumps(snapshot.to_dict(), indent=1))
    else:
        console = Console()
        if not console.is_terminal:  # piped to a file or a pager: no terminal width to wrap to
            console = Console(width=160)
        print_status(snapshot, console)


@main.command()
@click.option("--initial-peers", multiple=True, help="Multiaddr of a DHT node of the swarm (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the dashboard listens on.")
@click.option("--port", default=8080, show_default=True, help="Port of the dashboard (0: any free port).")
@click.option("--refresh", default=5.0, show_default=True, help="Seconds between re-reads of the swarm.")
def monitor(initial_peers, host: str, port: int, refresh: float) -> None:
    """Serve a live web dashboard of the swarm: health, coverage chart per model, peers."""
    from peer.monitor import Dashboard

    dht = swarm_reader(initial_peers)
    try:
        dashboard = Dashboard(dht, host, port, refresh)
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        dht.shutdown()
        raise click.ClickException(f"cannot serve the dashboard at {host}:{port}: {error.strerror or error}; "
                                   "choose another --port or --host") from None
    dashboard.start()
    print(f"dashboard at {dashboard.url}", flush=True)
    _wait_for_signal()
    dashboard.stop()
    dht.shutdown()
    print("dashboard stopped", flush=True)


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--blocks", callback=_parse_blocks, help="Serve blocks START:END (end exclusive).")
@click.option("--num-blocks", type=int, help="Serve this many blocks where the swarm needs them most (and move "
              "when other blocks need them more).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (the checkpoint's), float32, float16, bfloat16.")
@peer_options
def serve(model_path, blocks, num_blocks, device, dtype, **options) -> None:
    """Serve a span of MODEL_PATH's blocks (a local Hugging Face checkpoint folder)."""
    if blocks is None and num_blocks is None:
        raise click.UsageError("give --blocks START:END or --num-blocks N")
    run_peer(model_path, blocks, num_blocks, device, dtype, **options)


if __name__ == "__main__":
    main()

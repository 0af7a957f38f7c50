"""`swarm-peer`: start a bootstrap DHT node or serve a span of a model's blocks."""

import asyncio
import logging
import signal
import threading

import click

from swarm.constants import DEFAULT_ANNOUNCE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES


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


@click.group()
def main() -> None:
    """Run a Swarm peer: a DHT bootstrap node, or a server for a span of a model's transformer blocks."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="TCP port for the DHT (0: any free port).")
def bootstrap(host: str, port: int) -> None:
    """Start a DHT node that others join with --initial-peers; prints its multiaddrs."""
    from swarm.identity import swarm_dht

    dht, _ = swarm_dht(start=True, host_maddrs=[f"/ip4/{host}/tcp/{port}"])
    for address in dht.get_visible_maddrs():
        print(f"--initial-peers {address}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    dht.shutdown()
    print("bootstrap node stopped", flush=True)


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.option("--initial-peers", multiple=True, help="Multiaddr of a DHT node of the swarm (repeatable).")
@click.option("--blocks", callback=_parse_blocks, help="Serve blocks START:END (end exclusive).")
@click.option("--num-blocks", type=int, help="Serve this many blocks where the swarm has the fewest servers.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (the checkpoint's), float32, float16, bfloat16.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the data plane listens on.")
@click.option("--port", default=0, show_default=True, help="gRPC port (0: any free port).")
@click.option("--announce-host", help="Address others should use to reach this peer (default: --host).")
@click.option("--cache-tokens", default=8192, show_default=True, help="KV-cache pool size, in tokens of the span.")
@click.option("--announce-period", default=DEFAULT_ANNOUNCE_PERIOD, show_default=True, help="Seconds between DHT announcements.")
@click.option("--session-timeout", default=300.0, show_default=True, help="Close sessions idle this many seconds.")
@click.option("--max-message-mb", default=DEFAULT_MAX_MESSAGE_BYTES // 2**20, show_default=True)
@click.option("--public-name", default="", help="A name shown to others in the swarm's status.")
@click.option("--num-threads", type=int, help="CPU threads for compute (default: torch's, one per core). Peers that "
              "share a machine run faster with the cores split between them than with each using all of them.")
def serve(model_path, initial_peers, blocks, num_blocks, device, dtype, host, port, announce_host, cache_tokens,
          announce_period, session_timeout, max_message_mb, public_name, num_threads) -> None:
    """Serve a span of MODEL_PATH's blocks (a local Hugging Face checkpoint folder)."""
    import uvloop

    from peer.server import Peer, PeerConfig

    if blocks is None and num_blocks is None:
        raise click.UsageError("give --blocks START:END or --num-blocks N")
    config = PeerConfig(
        model_path=model_path, initial_peers=list(initial_peers), blocks=blocks, num_blocks=num_blocks,
        device=device, dtype=dtype, host=host, port=port, announce_host=announce_host, cache_tokens=cache_tokens,
        announce_period=announce_period, session_idle_timeout=session_timeout,
        max_message_bytes=max_message_mb * 2**20, public_name=public_name,
    )
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    uvloop.install()
    asyncio.run(Peer(config).run())


if __name__ == "__main__":
    main()

"""A running peer: loads its span, serves gRPC, announces itself, shuts down cleanly on SIGINT/SIGTERM."""

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import grpc
import torch

from peer.announcer import Announcer
from peer.handler import SwarmPeerServicer
from peer.memory_pool import CachePool
from peer.kv_pages import PAGE_SIZE, PagedKV
from peer.runtime import ComputeRuntime
from peer.throughput import measure_throughput
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.constants import PROTOCOL_VERSION
from swarm.identity import identity_of, own_subkey, swarm_dht
from swarm.dht_records import ServerRecord, ServerState, fetch_peer_spans
from swarm.tensors import DTYPE_NAMES
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


@dataclass
class PeerConfig:
    model_path: str
    initial_peers: list[str]
    blocks: tuple[int, int] | None  # None: choose `num_blocks` where the swarm needs them most
    num_blocks: int | None
    device: str = "cpu"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None
    cache_tokens: int = 8192
    announce_period: float = 30.0
    session_idle_timeout: float = 300.0
    max_message_bytes: int = 64 * 1024 * 1024
    public_name: str = ""


def resolve_dtype(name: str, checkpoint: Checkpoint) -> torch.dtype:
    if name == "auto":
        return checkpoint.checkpoint_dtype
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, not {name!r}")
    return getattr(torch, name)


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.checkpoint = Checkpoint(config.model_path)
        self.dtype = resolve_dtype(config.dtype, self.checkpoint)
        self.model_prefix = self.checkpoint.model_prefix()
        self.state = ServerState.JOINING
        self.throughput = 0.0
        self.address = ""
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        started = time.perf_counter()
        config = self.config
        self.dht, validator = swarm_dht(
            initial_peers=config.initial_peers, start=True, host_maddrs=[f"/ip4/{config.host}/tcp/0"]
        )
        self.identity = identity_of(validator.local_public_key)
        start, end = config.blocks or self._choose_blocks()
        self.start, self.end = start, end
        self.announcer = Announcer(self.dht, own_subkey(validator), self.model_prefix, self._model_info(), self._record, config.announce_period)
        await self.announcer.announce()  # joining
        loop = asyncio.get_running_loop()
        self.span = await loop.run_in_executor(
            None, BlockSpan.from_checkpoint, self.checkpoint, start, end, self.dtype, config.device
        )
        self.throughput = await loop.run_in_executor(None, measure_throughput, self.span, self.dtype)
        pool = CachePool(-(-config.cache_tokens // PAGE_SIZE), PAGE_SIZE)
        self.runtime = ComputeRuntime(self.span, PagedKV(end - start, pool.num_pages, PAGE_SIZE))
        self.servicer = SwarmPeerServicer(
            self.span, self.dtype, self.model_prefix, self.runtime, pool,
            config.max_message_bytes, config.session_idle_timeout, on_cache_change=self.announcer.announce_soon,
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_SwarmPeerServicer_to_server(self.servicer, server)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        await server.start()
        self.address = f"{config.announce_host or config.host}:{port}"
        self.state = ServerState.ONLINE
        await self.announcer.announce()  # online before we say so, so that whoever waits for this line finds us
        announcing = asyncio.create_task(self.announcer.run())
        print(
            f"peer {self.identity} online: blocks {start}:{end} of {self.model_prefix} "
            f"({DTYPE_NAMES[self.dtype]}, {self.throughput:.0f} tokens/s) at {self.address}, "
            f"ready in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stopping.set)
        await self.stopping.wait()
        print("shutting down: announcing offline, letting open requests finish", flush=True)
        announcing.cancel()
        self.state = ServerState.OFFLINE
        await self.announcer.announce()  # same lifetime as before: the DHT keeps the record that expires last
        await server.stop(grace=5)
        self.runtime.shutdown()
        self.dht.shutdown()
        print("stopped", flush=True)

    def _record(self) -> ServerRecord:
        start, end = self.start, self.end
        return ServerRecord(
            state=self.state,
            start_block=start,
            end_block=end,
            address=self.address,
            dtype=DTYPE_NAMES[self.dtype],
            version=PROTOCOL_VERSION,
            throughput=self.throughput,
            cache_tokens_left=self.servicer.cache_tokens_left if self.state == ServerState.ONLINE else 0,
            public_name=self.config.public_name,
        )

    def _model_info(self) -> dict:
        return {
            "name": self.checkpoint.path.name,
            "model_type": self.checkpoint.config.model_type,
            "num_blocks": self.checkpoint.config.num_hidden_layers,
        }

    def _choose_blocks(self) -> tuple[int, int]:
        """The window of `num_blocks` blocks with the fewest online servers now (ties: the earliest)."""
        total = self.checkpoint.config.num_hidden_layers
        count = min(self.config.num_blocks or total, total)
        coverage = [0] * total
        for span in fetch_peer_spans(self.dht, self.model_prefix, total):
            for block in range(span.start, span.end):
                coverage[block] += 1
        best_start = min(range(total - count + 1), key=lambda first: (sum(coverage[first : first + count]), first))
        return best_start, best_start + count

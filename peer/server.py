"""A running peer: loads its span, serves gRPC, announces itself, shuts down cleanly on SIGINT/SIGTERM."""

import asyncio
import functools
import logging
import random
import signal
import time
from dataclasses import dataclass, field

import grpc
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.activation_cache import ActivationCache
from peer.adapters import AdapterError, HostedAdapter, load_adapter, parse_adapter_option
from peer.announcer import Announcer
from peer.block_selection import DEFAULT_MARGIN, better_start, choose_start, planned_spans
from peer.calibration import Calibration, CalibrationCache, calibrate, machine_fingerprint
from peer.directory import PeerDirectory
from peer.handler import SwarmPeerServicer
from peer.kv_pages import PAGE_SIZE, PagedKV
from peer.memory_pool import CachePool
from peer.network import HelperServices, NetworkOptions, plan_network, wait_registered
from peer.pings import ping_successors
from peer.runtime import ComputeRuntime
from peer.throughput import ServedSpeed, network_throughput
from swarm.blocks import BlockSpan
from swarm.checkpoint import Checkpoint
from swarm.constants import DEFAULT_ACTIVATION_CACHE_MB, DEFAULT_BANDWIDTH_MBPS, PROTOCOL_VERSION
from swarm.coverage import block_throughputs
from swarm.dht_records import PeerSpan, ServerRecord, ServerState, fetch_peer_spans
from swarm.families import family_for
from swarm.identity import identity_of, load_or_create_key, own_subkey
from swarm.net.addresses import free_port, join_host_port, split_host_port
from swarm.net.endpoints import server_credentials
from swarm.net.tls import TLSIdentity
from swarm.quantization import serving_quantization
from swarm.tensors import DTYPE_NAMES
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

OFFLINE_ANNOUNCE_TIMEOUT = 5.0
PORT_PICK_ATTEMPTS = 5  # picks of a free data-plane port before giving up


@dataclass
class PeerConfig:
    model_path: str
    blocks: tuple[int, int] | None  # None: choose `num_blocks` where the swarm needs them most
    num_blocks: int | None
    device: str = "cpu"
    dtype: str = "auto"
    network: NetworkOptions = field(default_factory=lambda: NetworkOptions([]))
    cache_tokens: int = 8192
    announce_period: float = 30.0
    session_idle_timeout: float = 300.0
    max_message_bytes: int = 64 * 1024 * 1024
    public_name: str = ""
    balance_period: float = 120.0  # mean seconds between load-balancing checks (peers that did not pin --blocks)
    balance_margin: float = DEFAULT_MARGIN
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS
    identity_path: str | None = None  # private key file: the same identity across restarts
    adapters: tuple[str, ...] = ()  # peft LoRA adapter folders to host, "PATH" or "NAME=PATH"
    quantization: str = "none"  # how the blocks' linear weights are stored (swarm/quantization.py)
    num_threads: int | None = None  # CPU threads of a large pass (default: torch's, one per core)
    parallel_min_rows: int | None = None  # smaller passes run on one thread (default: measured)
    linear_layout: str = "measured"  # "rows", "columns" or measured per pass size (peer/linear_layout.py)
    activation_cache_mb: int = DEFAULT_ACTIVATION_CACHE_MB  # autograd state kept from Forwards for their Backwards


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
        self.quantization = serving_quantization(self.checkpoint.config, config.quantization)
        self.threads = config.num_threads or torch.get_num_threads()
        self.model_prefix = self.checkpoint.model_prefix()
        self.num_model_blocks = self.checkpoint.config.num_hidden_layers
        if config.blocks is not None and config.blocks[1] > self.num_model_blocks:
            raise ValueError(f"--blocks {config.blocks[0]}:{config.blocks[1]} is outside the model's 0:{self.num_model_blocks}")
        self.state = ServerState.JOINING
        self.calibration: Calibration | None = None
        self.speed: ServedSpeed | None = None  # of the span being served
        self.network_throughput = network_throughput(config.bandwidth_mbps, self.checkpoint.config.hidden_size, self.dtype)
        self.calibrations = CalibrationCache()
        self.machine = machine_fingerprint(config.device)  # part of the calibration's key
        self.next_pings: dict[str, float] = {}
        self.moving_to: int | None = None
        self.started_at = get_dht_time()
        self.adapter_paths = dict(parse_adapter_option(option) for option in config.adapters)
        for name, path in self.adapter_paths.items():
            if not (path / "adapter_config.json").is_file():
                raise AdapterError(f"adapter {name!r}: {path} is not a peft adapter folder (no adapter_config.json)")
        self.address = ""
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Starts, serves until SIGINT/SIGTERM, and stops; a signal during start-up stops what has started so far."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # from the first moment: a service manager may stop us early
            loop.add_signal_handler(signum, self.stopping.set)
        self.dht = self.server = self.helpers = self.servicer = self.announcer = self.network = None
        self.background: list[asyncio.Task] = []
        starting = asyncio.ensure_future(self._start())
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start-up error ends the run here (after the clean-up below)
                await stopping
                print("shutting down: announcing offline, letting open requests finish", flush=True)
            else:
                print("stopping before going online", flush=True)
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
        finally:
            stopping.cancel()
            await self._stop()
        print("stopped", flush=True)

    async def _start(self) -> None:
        started = time.perf_counter()
        config = self.config
        loop = asyncio.get_running_loop()
        key = load_or_create_key(config.identity_path) if config.identity_path else RSAPrivateKey()
        validator = RSASignatureValidator(key)
        self.identity = identity_of(validator.local_public_key)
        self.tls = TLSIdentity(key, self.identity)
        self.network = await plan_network(config.network, key, self.tls)
        for note in self.network.notes:
            print(note, flush=True)
        self.dht = self.network.dht
        self.start, self.end = config.blocks or await loop.run_in_executor(None, self._choose_blocks)
        self.calibration = self.calibrations.get(self._calibration_key())  # known before loading if measured once
        self.helpers = HelperServices() if self.network.helps_others else None
        self.announcer = Announcer(
            self.dht, own_subkey(validator), self.model_prefix, self._model_info(), self._record,
            config.announce_period, rendezvous=self._rendezvous_record,
        )
        await self.announcer.announce()  # joining
        self.span = await self._load(self.start)
        pool = CachePool(-(-config.cache_tokens // PAGE_SIZE), PAGE_SIZE)
        self.directory = PeerDirectory(self._swarm)
        self.servicer = SwarmPeerServicer(
            self.span, self.dtype, self.model_prefix, self._new_runtime(self.span), pool,
            config.max_message_bytes, config.session_idle_timeout, on_cache_change=self.announcer.announce_soon,
            adapters=self._load_adapters(self.span), directory=self.directory,
            activations=ActivationCache(config.activation_cache_mb << 20),
        )
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_SwarmPeerServicer_to_server(self.servicer, self.server)
        if self.helpers is not None:
            self.helpers.add_to(self.server)
        self._bind_data_plane(config.network.port)
        await self.server.start()
        self.background.append(asyncio.create_task(self._ping_forever()))
        if self.helpers is not None:
            await self.helpers.start(self.network.listen_host, config.network.relay_port, split_host_port(self.network.address)[0])
        if self.network.relay_listener is not None:
            self.network.relay_listener.on_move = self._moved_relay
            self.background.append(asyncio.create_task(self.network.relay_listener.run()))
            await wait_registered(self.network.relay_listener)
        self.address = self.network.address
        self.state = ServerState.ONLINE
        await self.announcer.announce()  # online before we say so, so that whoever waits for this line finds us
        self.background.append(asyncio.create_task(self.announcer.run()))
        if config.blocks is None:
            self.background.append(asyncio.create_task(self._balance_forever()))
        where = f"via relay {self.network.relay}" if self.network.relay else f"at {self.address}"
        print(
            f"peer {self.identity} online: blocks {self.start}:{self.end} of {self.model_prefix} "
            f"({self._weights()}, {self.throughput:.0f} tokens/s, {self.calibration.plan.describe()}) {where}, "
            f"{self.network.reachability}, ready in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

    async def _stop(self) -> None:
        """Stops whatever `_start` got to, in order: background work, the offline announcement, the server (open
        requests finish), pushes, relaying, compute threads, and the DHT node last."""
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.announcer is not None:
            self.state = ServerState.OFFLINE
            try:  # same lifetime as before: the DHT keeps the record that expires last
                await self.announcer.announce(timeout=OFFLINE_ANNOUNCE_TIMEOUT)
            except Exception as error:  # e.g. the whole process group was stopped and the DHT daemon is gone
                logger.warning(f"could not announce going offline ({error!r}); our records expire by themselves")
        if self.server is not None:
            await self.server.stop(grace=5)
        if self.servicer is not None:
            await self.servicer.pusher.close()
            self.servicer.runtime.shutdown()
        if self.network is not None and self.network.relay_listener is not None:
            await self.network.relay_listener.close()
        if self.helpers is not None:
            await self.helpers.stop()
        if self.network is not None:
            self.network.dht.shutdown()

    def _bind_data_plane(self, requested_port: int) -> None:
        """Binds the gRPC server. A port this peer picked itself can be taken by another process before the bind
        (it was free when picked): then another is picked, a few times; a port the operator asked for is not."""
        credentials = server_credentials(self.tls.certificate, self.tls.private_key_pem)
        for attempt in range(PORT_PICK_ATTEMPTS):
            try:
                self.server.add_secure_port(join_host_port(self.network.listen_host, self.network.port), credentials)
                return
            except RuntimeError:
                if requested_port or attempt == PORT_PICK_ATTEMPTS - 1:
                    raise OSError(f"cannot listen on {self.network.listen_host}:{self.network.port}: the address is "
                                  "in use (another process holds that port?)") from None
                logger.info(f"port {self.network.port} was taken before this peer bound it; picking another")
                self.network.move_to_port(free_port(self.network.listen_host))

    def _moved_relay(self, relay: str) -> None:
        """Our relay went away and we registered with another: the swarm must know at once."""
        self.network.relay = relay
        self.announcer.announce_soon()

    def _rendezvous_record(self) -> dict | None:
        """Dial-backs and relaying we offer others, announced while we are online and reachable."""
        if self.helpers is None or self.state != ServerState.ONLINE:
            return None
        return self.helpers.record(self.identity, self.address, self.tls.certificate).to_dict()

    async def _load(self, start: int) -> BlockSpan:
        """Loads blocks [start, start + span length) and calibrates them unless this setting was measured before."""
        loop = asyncio.get_running_loop()
        end = start + self.end - self.start
        config = self.config
        span = await loop.run_in_executor(
            None, BlockSpan.from_checkpoint, self.checkpoint, start, end, self.dtype, config.device, self.quantization
        )
        measure = functools.partial(
            calibrate, span, self.dtype, self.threads, config.parallel_min_rows, config.linear_layout
        )
        self.calibration = await loop.run_in_executor(None, self.calibrations.get_or_measure, self._calibration_key(), measure)
        return span

    @property
    def throughput(self) -> float:
        """What this peer computes: as served lately, else as calibrated, else unknown yet (0)."""
        if self.speed is not None:
            return self.speed.throughput
        return self.calibration.throughput if self.calibration is not None else 0.0

    def _load_adapters(self, span: BlockSpan) -> dict[str, HostedAdapter]:
        layers_prefix = family_for(self.checkpoint.config).layers_prefix
        return {name: load_adapter(name, path, span, layers_prefix, self.dtype) for name, path in self.adapter_paths.items()}

    def _new_runtime(self, span: BlockSpan) -> ComputeRuntime:
        """A runtime for `span` (just loaded: `self.calibration` is its own), its speed followed from now on."""
        num_pages = -(-self.config.cache_tokens // PAGE_SIZE)
        self.speed = ServedSpeed(self.calibration)
        kv = PagedKV(span.end - span.start, num_pages, PAGE_SIZE)
        return ComputeRuntime(span, kv, self.calibration.plan, on_pass=self.speed.record)

    def _calibration_key(self) -> str:
        rows = self.config.parallel_min_rows or "measured"
        return (f"{self.model_prefix} blocks={self.end - self.start} {self.config.device} {self.dtype} "
                f"quantization={self.quantization} "
                f"threads={self.threads} parallel_min_rows={rows} linear_layout={self.config.linear_layout} "
                f"| {self.machine}")

    def _record(self) -> ServerRecord:
        return ServerRecord(
            state=self.state,
            start_block=self.start,
            end_block=self.end,
            address=self.address,
            dtype=DTYPE_NAMES[self.dtype],
            quantization=self.quantization,
            version=PROTOCOL_VERSION,
            throughput=self.throughput,
            network_throughput=self.network_throughput,
            cache_tokens_left=self.servicer.cache_tokens_left if self.state == ServerState.ONLINE else 0,
            public_name=self.config.public_name,
            adapters=tuple(self.adapter_paths),
            next_pings=self.next_pings,
            moving_to=self.moving_to,
            started_at=self.started_at,
            certificate=self.tls.certificate,
            relay=self.network.relay,
        )

    def _weights(self) -> str:
        """The dtype, and the quantization if any: "float32" or "float32, nf4 weights"."""
        dtype = DTYPE_NAMES[self.dtype]
        return dtype if self.quantization == "none" else f"{dtype}, {self.quantization} weights"

    def _model_info(self) -> dict:
        return {
            "name": self.checkpoint.path.name,
            "model_type": self.checkpoint.config.model_type,
            "num_blocks": self.num_model_blocks,
        }

    def _swarm(self) -> list[PeerSpan]:
        return fetch_peer_spans(self.dht, self.model_prefix, self.num_model_blocks, (ServerState.JOINING, ServerState.ONLINE))

    def _choose_blocks(self) -> tuple[int, int]:
        """The `num_blocks` window where the swarm is weakest now (peers still joining count where they will be)."""
        count = min(self.config.num_blocks or self.num_model_blocks, self.num_model_blocks)
        start = choose_start(block_throughputs(planned_spans(self._swarm()), self.num_model_blocks), count)
        return start, start + count

    async def _ping_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            spans = await loop.run_in_executor(None, self._swarm)
            self.directory.update(spans)
            self.next_pings = await ping_successors(spans, self.identity, self.end)
            await asyncio.sleep(self.config.announce_period)

    async def _balance_forever(self) -> None:
        """Every randomised period, move to other blocks if that clearly helps the swarm (see block_selection)."""
        while True:
            await asyncio.sleep(self.config.balance_period * random.uniform(0.5, 1.5))  # peers do not decide in step
            try:
                await self._rebalance()
            except Exception as error:  # a failed check or load must not take a serving peer down
                logger.warning(f"load balancing failed, staying on blocks {self.start}:{self.end}: {error!r}")
                self.moving_to = None

    async def _better_start(self) -> int | None:
        spans = await asyncio.get_running_loop().run_in_executor(None, self._swarm)
        own = PeerSpan(self.identity, self._record())
        return better_start(spans, own, self.num_model_blocks, self.config.balance_margin)

    async def _rebalance(self) -> None:
        """Loads the new span while still serving the old one, then switches: coverage never has a hole."""
        new_start = await self._better_start()
        if new_start is None:
            return
        self.moving_to = new_start
        await self.announcer.announce()  # others plan with us there and do not rush to the same blocks
        length = self.end - self.start
        logger.warning(f"load balancing: moving from blocks {self.start}:{self.end} to {new_start}:{new_start + length}")
        # Load, and give others a period to announce: a record missed once (a DHT hiccup, a peer that was about to
        # re-announce) must not make us move, and two peers that decided together see each other's plan.
        span, _ = await asyncio.gather(self._load(new_start), asyncio.sleep(self.config.announce_period))
        if await self._better_start() != new_start:  # the swarm changed meanwhile: keep serving where we are
            self.moving_to = None
            await self.announcer.announce()
            return
        old_runtime = self.servicer.switch_span(span, self._new_runtime(span), self._load_adapters(span))
        self.start, self.end, self.span, self.moving_to = new_start, new_start + length, span, None
        await self.announcer.announce()
        await asyncio.get_running_loop().run_in_executor(None, old_runtime.shutdown)
        print(f"peer {self.identity} moved: blocks {self.start}:{self.end}", flush=True)

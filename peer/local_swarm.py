"""A swarm on this machine: a bootstrap DHT node and peers, each a real `swarm-peer` process on loopback.

Used by the demo, the benchmarks and the tests.
"""

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from swarm.net.endpoints import Endpoint

START_TIMEOUT = 120.0


@dataclass
class SwarmProcess:
    process: subprocess.Popen
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if match := re.search(pattern, line):
                return match
        raise TimeoutError(f"no line matching {pattern!r}; output so far:\n{''.join(self.output)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Sends `sig` to the process (SIGKILL plays a machine dying), waits, then kills whatever is left of its
        process group: a peer's DHT node and libp2p daemon are child processes that would outlive a killed peer."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


def process_group_gone(pgid: int, timeout: float) -> bool:
    """Waits (up to `timeout` seconds) until no process of the group is left; False if some still is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def spawn_cli(*args: str, module: str = "peer.cli", launcher: Callable[[list[str]], list[str]] | None = None,
              env: dict[str, str] | None = None) -> SwarmProcess:
    """Runs `python -m peer.cli ARGS` (or another module exposing the same CLI, e.g. a test's instrumented one);
    `launcher` wraps the command line (e.g. to run it in a test bed's network namespace); `env` adds variables."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **(env or {}))
    argv = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(
        launcher(argv) if launcher else argv,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,  # its own process group, so that stop() can take its children down with it
    )
    return SwarmProcess(process)


def start_bootstrap(*args: str, launcher: Callable[[list[str]], list[str]] | None = None) -> tuple[SwarmProcess, str]:
    """A bootstrap node (on loopback unless `args` or a `launcher` say otherwise); returns it and its first
    multiaddr (a non-loopback one, when it listens beyond loopback)."""
    if not args and launcher is None:
        args = ("--host", "127.0.0.1")
    node = spawn_cli("bootstrap", *args, launcher=launcher)
    address = node.wait_for_line(r"--initial-peers (\S+)").group(1)
    node.wait_for_line(r"dial-back at")
    return node, address


ONLINE_LINE = r"peer (\S+) online: blocks (\d+):\d+ of (\S+) \(([^)]*)\) (?:at|via relay) (\S+), (\w+),"


@dataclass
class PeerHandle:
    process: SwarmProcess
    peer_id: str
    address: str  # host:port, or the relay's when `reachability` is "relayed"
    model_prefix: str = ""
    start_block: int = 0
    reachability: str = "local"
    compute: str = ""  # dtype, throughput and thread plan, as the peer announced them when it came online

    @classmethod
    def from_online_line(cls, process: SwarmProcess, timeout: float = START_TIMEOUT) -> "PeerHandle":
        match = process.wait_for_line(ONLINE_LINE, timeout)
        peer_id, start, prefix, compute, address, reachability = match.groups()
        return cls(process, peer_id, address, prefix, int(start), reachability, compute)

    def endpoint(self, dht) -> Endpoint:
        """Where and who the peer is, as its signed record in the DHT says (for raw channels in tests and benches)."""
        from swarm.dht_records import fetch_peer_record

        span = fetch_peer_record(dht, self.model_prefix, self.start_block, self.peer_id)
        if span is None:
            raise LookupError(f"peer {self.peer_id} has no valid record at block {self.start_block}")
        return span.endpoint


def start_peers(
    model_path: str, initial_peer: str, spans: list[str], *extra: str, module: str = "peer.cli",
    options_per_span: list[tuple[str, ...]] | None = None,
) -> list[PeerHandle]:
    """Starts one peer per span ("0:2", ...) at once, each with the `extra` options and its own entry of
    `options_per_span`, and waits until each is online."""
    processes = [
        spawn_cli(
            "serve", str(model_path), "--initial-peers", initial_peer, "--blocks", span,
            "--announce-period", "5", "--num-threads", "1", *extra, *own, module=module,
        )
        for span, own in zip(spans, options_per_span or [()] * len(spans), strict=True)
    ]
    return [PeerHandle.from_online_line(process) for process in processes]


@contextlib.contextmanager
def local_swarm(model_path: str, spans: list[str], *peer_args: str) -> Iterator[str]:
    """Bootstrap + one peer per span; yields the bootstrap multiaddr and stops everything on exit."""
    node, address = start_bootstrap()
    peers: list[PeerHandle] = []
    try:
        peers = start_peers(model_path, address, spans, *peer_args)
        yield address
    finally:
        for peer in peers:
            peer.process.stop()
        node.stop()

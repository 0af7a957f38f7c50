"""Starting the forwarder (python -m tests.netbed.forwarder) inside a host of the bed."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bed import Host

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line from proc.stdout (a binary pipe), waiting at most `timeout` seconds."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line within {timeout}s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"forwarder exited (status {proc.poll()}) before listening; got {data!r}")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


def start_forwarder(host: "Host", to: str, delay_ms: float = 0, flip_after: int | None = None,
                    capture: str | None = None, listen_port: int = 0,
                    timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    """Start the forwarder inside `host`, listening on host.ip:listen_port; returns (process, "ip:port").

    The caller stops it (terminate, wait, kill on timeout)."""
    argv = [sys.executable, "-m", "tests.netbed.forwarder", "--listen", f"{host.ip}:{listen_port}", "--to", to]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    if flip_after is not None:
        argv += ["--flip-after", str(flip_after)]
    if capture is not None:
        argv += ["--capture", str(capture)]
    proc = host.popen(argv, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        line = read_line(proc, timeout)
        prefix = "forwarding "
        if not line.startswith(prefix):
            raise RuntimeError(f"unexpected forwarder output: {line!r}")
        address = line[len(prefix):].split(" -> ", 1)[0]
    except BaseException:
        proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)
        raise
    return proc, address


def stop_forwarder(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

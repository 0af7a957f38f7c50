"""The network-namespace test bed (tests/netbed) really isolates, NATs, shapes and forwards traffic."""

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netbed import ROUTER_PUBLIC_IP, NetBed, available, read_line, start_forwarder

REASON = available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network test bed here: {REASON}")
REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny TCP server: prints its port, then serves each connection in a thread.
#   peer: sends the peer's address; echo: echoes; sink: reads an 8-byte length, then that many bytes, replies "done".
SERVER = r"""
import socket, sys, threading
mode = sys.argv[2]
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
def recv_exactly(c, n):
    got = 0
    while got < n:
        d = c.recv(min(1 << 20, n - got))
        if not d: raise EOFError
        got += len(d)
def serve(c, a):
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "peer":
            c.sendall(a[0].encode())
        elif mode == "echo":
            while d := c.recv(65536): c.sendall(d)
        else:
            head = b""
            while len(head) < 8: head += c.recv(8 - len(head))
            recv_exactly(c, int.from_bytes(head, "big")); c.sendall(b"done")
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""

# Clients: argv = ip port mode [arg]; print one JSON line.
CLIENT = r"""
import json, socket, statistics, sys, time
ip, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((ip, port), timeout=float(sys.argv[5]) if len(sys.argv) > 5 else 10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def recv_exactly(n):
    out = bytearray()
    while len(out) < n:
        d = c.recv(n - len(out))
        if not d: raise EOFError(len(out))
        out += d
    return bytes(out)
if mode == "peer":
    print(json.dumps({"peer": c.recv(100).decode()}))
elif mode == "pingpong":
    times = []
    for _ in range(int(sys.argv[4])):
        t = time.perf_counter(); c.sendall(b"x" * 64); recv_exactly(64); times.append(time.perf_counter() - t)
    print(json.dumps({"rtt_ms": statistics.median(times) * 1000}))
elif mode == "bulk":
    n = int(sys.argv[4]); block = b"\xab" * (1 << 20)
    t = time.perf_counter(); c.sendall(n.to_bytes(8, "big"))
    for i in range(0, n, len(block)): c.sendall(block[: n - i])
    assert recv_exactly(4) == b"done"
    print(json.dumps({"seconds": time.perf_counter() - t}))
elif mode == "roundtrip":
    payload = bytes(range(256)) * (int(sys.argv[4]) // 256)
    c.sendall(payload)
    print(json.dumps({"back": recv_exactly(len(payload)).hex()}))
"""


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Server:
    def __init__(self, host, mode):
        self.proc = host.popen([sys.executable, "-c", SERVER, host.ip, mode], stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
        try:
            self.address = f"{host.ip}:{int(read_line(self.proc, 10))}"
        except BaseException:
            stop(self.proc)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stop(self.proc)


def client(host, address, mode, *args, timeout=30):
    ip, port = address.rsplit(":", 1)
    result = host.run([sys.executable, "-c", CLIENT, ip, port, mode, *map(str, args)], timeout=timeout,
                      check=False, cwd=str(REPO_ROOT))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def bed():
    with NetBed(public=["boot", "a", "b", "client"], home=["home1", "home2"]) as bed:
        yield bed


def test_layout(bed):
    assert [bed[n].ip for n in ("boot", "a", "b", "client")] == [f"10.213.0.{i}" for i in range(1, 5)]
    assert [bed[n].ip for n in ("home1", "home2")] == ["192.168.213.2", "192.168.213.3"]
    assert bed.router.ip == ROUTER_PUBLIC_IP
    assert "192.168.213" not in bed["a"].run(["ip", "route"]).stdout  # public hosts know no home route


def test_public_hosts_connect(bed):
    with Server(bed["b"], "peer") as server:
        assert client(bed["a"], server.address, "peer")["peer"] == bed["a"].ip


def test_home_host_is_masqueraded(bed):
    with Server(bed["b"], "peer") as server:
        assert client(bed["home1"], server.address, "peer")["peer"] == ROUTER_PUBLIC_IP
    with Server(bed["home2"], "peer") as server:  # the home LAN itself is open
        assert client(bed["home1"], server.address, "peer")["peer"] == bed["home1"].ip


def test_public_host_cannot_reach_home(bed):
    a, home = bed["a"], bed["home1"]
    with Server(home, "peer") as server:
        ip, port = server.address.rsplit(":", 1)
        attempt = [sys.executable, "-c", CLIENT, ip, port, "peer", "", "2"]
        started = time.monotonic()
        assert a.run(attempt, check=False, timeout=10).returncode != 0  # no route at all
        # Even with a route through the router, its firewall drops new inbound connections.
        a.run(["ip", "route", "add", "192.168.213.0/24", "via", ROUTER_PUBLIC_IP])
        try:
            failed = a.run(attempt, check=False, timeout=10)
        finally:
            a.run(["ip", "route", "del", "192.168.213.0/24"])
        assert failed.returncode != 0 and "timed out" in failed.stderr, failed.stderr
        assert time.monotonic() - started < 8


def test_limit_bandwidth(bed):
    size = 3_000_000
    with Server(bed["b"], "sink") as server:
        bed["a"].limit_bandwidth(10)
        try:
            seconds = client(bed["a"], server.address, "bulk", size)["seconds"]
        finally:
            bed["a"].clear_bandwidth()
        fast = client(bed["a"], server.address, "bulk", size)["seconds"]
    mbit = size * 8 / seconds / 1e6
    print(f"limited: {mbit:.2f} Mbit/s; unlimited: {size * 8 / fast / 1e6:.0f} Mbit/s")
    assert 5 <= mbit <= 12
    assert fast < seconds / 5


def test_forwarder_delay(bed):
    with Server(bed["b"], "echo") as echo, Server(bed["b"], "sink") as sink:
        direct = client(bed["a"], echo.address, "pingpong", 10)["rtt_ms"]
        fwd, address = start_forwarder(bed["boot"], echo.address, delay_ms=50)
        try:
            delayed = client(bed["a"], address, "pingpong", 10)["rtt_ms"]
        finally:
            stop(fwd)
        assert fwd.returncode == 0  # clean exit on SIGTERM
        fwd, address = start_forwarder(bed["boot"], sink.address, delay_ms=50)
        try:
            size = 64 * 1024 * 1024
            seconds = client(bed["a"], address, "bulk", size)["seconds"]
        finally:
            stop(fwd)
    rate = size / seconds / 1e6
    print(f"round trip: direct {direct:.2f} ms, through a 50 ms forwarder {delayed:.1f} ms; bulk {rate:.0f} MB/s")
    assert direct < 20
    assert 95 <= delayed < 200
    assert rate > 20  # one 64 KiB chunk per 50 ms would be 1.3 MB/s


def test_forwarder_flip_and_capture(bed, tmp_path):
    size, offset = 8192, 1000
    capture = tmp_path / "capture.bin"
    sent = bytes(range(256)) * (size // 256)
    with Server(bed["b"], "echo") as echo:
        fwd, address = start_forwarder(bed["boot"], echo.address)
        try:
            assert bytes.fromhex(client(bed["a"], address, "roundtrip", size)["back"]) == sent
        finally:
            stop(fwd)
        fwd, address = start_forwarder(bed["boot"], echo.address, flip_after=offset, capture=str(capture))
        try:
            back = bytes.fromhex(client(bed["a"], address, "roundtrip", size)["back"])
        finally:
            stop(fwd)
    diff = [i for i in range(size) if back[i] != sent[i]]
    assert diff == [offset] and back[offset] == sent[offset] ^ 0xFF
    seen = capture.read_bytes()
    assert len(seen) == 2 * size
    assert collections.Counter(seen) == collections.Counter(sent) + collections.Counter(back)


def test_namespaces_removed_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with NetBed(public=["x", "y"], home=["z"]) as bed:
            made = [bed.bridge_netns, bed.router.netns] + [h.netns for h in bed.hosts.values()]
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
            assert all(ns in listed for ns in made)
            sleeper = bed["x"].popen(["sleep", "60"])  # left running on purpose: the bed stops it
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    assert not set(made) & set(listed)
    assert sleeper.wait(5) is not None

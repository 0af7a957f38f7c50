"""Hosts as Linux network namespaces: a public "internet" bridge and an optional home LAN behind NAT.

Layout (every interface lives inside a namespace the bed created; the root
namespace only gains the namespace names, which are removed on exit):

* ``<prefix>-br``: a namespace holding bridge ``br0``, with one veth port per
  public host (``p0``, ``p1``...) and one for the router (``rt``).
* each public host: its own namespace, ``eth0`` = 10.213.0.1, .2, ... /24 (no
  default route, so nothing can leave the bed).
* if there are home hosts: ``<prefix>-router`` with ``wan`` = 10.213.0.254/24
  on the public bridge and bridge ``lan`` = 192.168.213.1/24; home hosts get
  ``eth0`` = 192.168.213.2, .3, ... with the router as default gateway.
  nftables there masquerades what leaves through ``wan`` and forwards new
  connections only from the inside.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import subprocess
import time

PUBLIC_NET = "10.213.0"
HOME_NET = "192.168.213"
ROUTER_PUBLIC_IP = f"{PUBLIC_NET}.254"
ROUTER_HOME_IP = f"{HOME_NET}.1"
NS_PREFIX = "swnb"
_NS_PATTERN = re.compile(rf"^{NS_PREFIX}(\d+)-\d+-")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_counter = itertools.count()

ROUTER_RULES = """
table inet netbed {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname != "wan" accept
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
"""


def _sh(argv: list[str], timeout: float = 20, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a setup command; raise with its stderr if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _netns_list() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _kill_namespace(netns: str, grace: float = 2.0) -> None:
    """Stop whatever still runs in netns (SIGTERM, then SIGKILL), then delete it."""
    def pids() -> list[int]:
        result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        remaining = pids()
        if not remaining:
            break
        for pid in remaining:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces left by beds whose process is gone (a crashed earlier run)."""
    removed = []
    for netns in _netns_list():
        match = _NS_PATTERN.match(netns)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _kill_namespace(netns, grace=0.5)
            removed.append(netns)
    return removed


@functools.lru_cache(maxsize=None)
def available() -> str | None:
    """None when this machine can build a bed (root, `ip netns`, nft); else a one-line reason."""
    import shutil

    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}-probe"
    try:
        _sh(["ip", "netns", "add", probe])
    except Exception as error:  # noqa: BLE001
        return f"cannot create a network namespace: {error}".splitlines()[0]
    try:
        _sh(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        _sh(["ip", "-n", probe, "link", "add", "b0", "type", "bridge"])
        _sh(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=ROUTER_RULES.replace("netbed", "probe"))
    except Exception as error:  # noqa: BLE001
        return f"network namespace setup fails: {error}".splitlines()[0]
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    return None


class Host:
    """One network namespace of the bed."""

    def __init__(self, name: str, netns: str, ip: str, interface: str = "eth0"):
        self.name = name
        self.netns = netns
        self.ip = ip
        self.interface = interface

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, ip={self.ip!r})"

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *map(str, argv)]

    def popen(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside the namespace (`ip netns exec` execs it, so the Popen's pid is argv's)."""
        return subprocess.Popen(self.command(argv), **popen_kwargs)

    def run(self, argv: list[str], timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, check=check,
                              **kwargs)

    def limit_bandwidth(self, mbit: float) -> None:
        """Cap this host's egress (its eth0) at `mbit` Mbit/s with a token bucket filter."""
        if mbit <= 0:
            raise ValueError("mbit must be positive")
        bytes_per_s = mbit * 1e6 / 8
        # At least a few full-size (also GSO) packets, or ~4 ms worth of traffic at high rates.
        burst = max(32 * 1024, int(bytes_per_s * 0.004))
        _sh(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", self.interface, "root", "tbf",
             "rate", f"{int(mbit * 1000)}kbit", "burst", str(burst), "latency", "50ms"])

    def clear_bandwidth(self) -> None:
        subprocess.run(self.command(["tc", "qdisc", "del", "dev", self.interface, "root"]),
                       capture_output=True, timeout=10)


class NetBed:
    """Context manager building the namespaces; `with NetBed(public=[...], home=[...]) as bed: bed["a"].ip`."""

    def __init__(self, public: list[str], home: list[str] = ()):
        public, home = list(public), list(home)
        names = public + home
        for name in names:
            if not _NAME_PATTERN.match(name) or name in ("br", "router"):
                raise ValueError(f"bad host name {name!r} (letters, digits, _; not 'br' or 'router')")
        if len(set(names)) != len(names):
            raise ValueError("host names must be unique")
        if len(public) > 253 or len(home) > 253:
            raise ValueError("too many hosts")
        self.public_names = public
        self.home_names = home
        self.prefix = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.hosts: dict[str, Host] = {}
        self.router: Host | None = None
        self.bridge_netns = f"{self.prefix}-br"
        self.namespaces: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _add_netns(self, netns: str) -> None:
        _sh(["ip", "netns", "add", netns])
        self.namespaces.append(netns)
        _sh(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _link(self, netns: str, ifname: str, peer_netns: str, peer_ifname: str) -> None:
        """A veth pair created straight inside the two namespaces (never in the root one)."""
        _sh(["ip", "-n", netns, "link", "add", ifname, "type", "veth", "peer", "name", peer_ifname,
             "netns", peer_netns])

    def __enter__(self) -> "NetBed":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sweep_stale()
        br = self.bridge_netns
        self._add_netns(br)
        _sh(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", br, "link", "set", "br0", "up"])
        for index, name in enumerate(self.public_names):
            host = Host(name, f"{self.prefix}-{name}", f"{PUBLIC_NET}.{index + 1}")
            self._add_netns(host.netns)
            port = f"p{index}"
            self._link(host.netns, "eth0", br, port)
            _sh(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
            _sh(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            _sh(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            self.hosts[name] = host
        if self.home_names:
            router = Host("router", f"{self.prefix}-router", ROUTER_PUBLIC_IP, interface="wan")
            self._add_netns(router.netns)
            self._link(router.netns, "wan", br, "rt")
            _sh(["ip", "-n", br, "link", "set", "rt", "master", "br0", "up"])
            _sh(["ip", "-n", router.netns, "addr", "add", f"{ROUTER_PUBLIC_IP}/24", "dev", "wan"])
            _sh(["ip", "-n", router.netns, "link", "set", "wan", "up"])
            _sh(["ip", "-n", router.netns, "link", "add", "lan", "type", "bridge"])
            _sh(["ip", "-n", router.netns, "addr", "add", f"{ROUTER_HOME_IP}/24", "dev", "lan"])
            _sh(["ip", "-n", router.netns, "link", "set", "lan", "up"])
            _sh(router.command(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
            _sh(router.command(["nft", "-f", "-"]), input=ROUTER_RULES)
            self.router = router
            for index, name in enumerate(self.home_names):
                host = Host(name, f"{self.prefix}-{name}", f"{HOME_NET}.{index + 2}")
                self._add_netns(host.netns)
                port = f"h{index}"
                self._link(host.netns, "eth0", router.netns, port)
                _sh(["ip", "-n", router.netns, "link", "set", port, "master", "lan", "up"])
                _sh(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
                _sh(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
                _sh(["ip", "-n", host.netns, "route", "add", "default", "via", ROUTER_HOME_IP])
                self.hosts[name] = host

    def close(self) -> None:
        """Remove every namespace this bed made (stopping processes left in them); safe to call twice."""
        for netns in reversed(self.namespaces):
            try:
                _kill_namespace(netns)
            except Exception:  # noqa: BLE001 - keep removing the others
                pass
        self.namespaces = [ns for ns in self.namespaces if ns in _netns_list()]

    def __exit__(self, *exc_info) -> None:
        self.close()

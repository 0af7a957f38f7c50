"""Addresses: which swarm is on this machine only, what a host:port means, where a node is seen from."""

import ipaddress
import socket

from hivemind.utils.multiaddr import Multiaddr


class AddressError(ValueError):
    """A malformed or unusable address given by a user or announced by a peer."""


def maddr_host(maddr: str) -> str | None:
    """The IP address of a multiaddr (/ip4/1.2.3.4/tcp/...), None if it names none (e.g. /dns/...)."""
    try:
        parsed = Multiaddr(maddr)
    except Exception as error:  # multiaddr raises several types for garbage
        raise AddressError(f"{maddr!r} is not a multiaddr (expected e.g. /ip4/203.0.113.7/tcp/31337/p2p/Qm...)") from error
    for protocol in ("ip4", "ip6"):
        try:
            return parsed.value_for_protocol(protocol)
        except Exception:
            continue
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def swarm_is_local(initial_peers: list[str]) -> bool:
    """A swarm whose every initial peer is on loopback lives on this machine: loopback addresses are right for it."""
    return bool(initial_peers) and all(is_loopback(maddr_host(maddr) or "") for maddr in initial_peers)


def tcp_maddr(host: str, port: int) -> str:
    """The multiaddr a DHT node listens on or announces for host:port."""
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def is_public_maddr(maddr: str) -> bool:
    """Whether another machine could dial this multiaddr (not loopback, not unspecified)."""
    host = maddr_host(str(maddr))
    return bool(host) and not is_loopback(host) and not is_unspecified(host)


def first_public_host(maddrs) -> str | None:
    """The first address among a DHT node's visible multiaddrs that another machine could dial (not loopback)."""
    return next((maddr_host(str(maddr)) for maddr in maddrs if is_public_maddr(maddr)), None)


def split_host_port(address: str) -> tuple[str, int]:
    """Parses "host:port" or "[v6]:port"; AddressError if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{address!r} is not host:port")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str) -> int:
    """A TCP port free on `host` now (for a listener whose port must be known before it starts)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def grpc_peer_host(peer: str) -> str | None:
    """The IP address in a gRPC context.peer() string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    return rest.rpartition(":")[0].strip("[]") or None

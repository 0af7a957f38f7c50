"""A multi-host network test bed built from Linux network namespaces (needs root, iproute2, nftables).

    from tests.netbed import NetBed, available, start_forwarder

    with NetBed(public=["boot", "a", "b"], home=["home1"]) as bed:
        bed["a"].ip                      # "10.213.0.2"
        bed["home1"].popen([...])        # runs inside home1's namespace, behind NAT
"""

from .bed import HOME_NET, PUBLIC_NET, ROUTER_HOME_IP, ROUTER_PUBLIC_IP, Host, NetBed, available, sweep_stale
from .launch import read_line, start_forwarder, stop_forwarder

__all__ = [
    "HOME_NET", "PUBLIC_NET", "ROUTER_HOME_IP", "ROUTER_PUBLIC_IP",
    "Host", "NetBed", "available", "read_line", "start_forwarder", "stop_forwarder", "sweep_stale",
]

"""gRPC channels to peers, one per address, and conversion of gRPC failures into RemoteError."""

import threading
import time

import grpc

from swarm.errors import RemoteError
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc


class PeerConnections:
    def __init__(self, max_message_bytes: int):
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._stubs: dict[str, pb_grpc.SwarmPeerStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.SwarmPeerStub:
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address, options=self._options)
                self._channels.append(channel)
                self._stubs[address] = pb_grpc.SwarmPeerStub(channel)
            return self._stubs[address]

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()
            self._stubs.clear()


def remote_error(peer: str, error: grpc.RpcError) -> RemoteError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return RemoteError(peer, code.name if code is not None else "UNKNOWN", details or "")


class StreamWatchdog:
    """Cancels stream calls that wait longer than their deadline for an answer (a hung peer would otherwise block
    a session forever); the cancelled call fails with CANCELLED, which the session treats as a peer failure.

    One thread for the whole client, waking every `tick` seconds; arming and disarming are dictionary updates, so
    the hot path pays no thread hand-off.
    """

    def __init__(self, tick: float = 0.25):
        self._deadlines: dict[int, tuple[float, grpc.Future]] = {}
        self._lock = threading.Lock()
        self._tick = tick
        threading.Thread(target=self._watch, name="swarm-stream-watchdog", daemon=True).start()

    def arm(self, call, timeout: float) -> None:
        with self._lock:
            self._deadlines[id(call)] = (time.monotonic() + timeout, call)

    def disarm(self, call) -> None:
        with self._lock:
            self._deadlines.pop(id(call), None)

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                expired = [key for key, (deadline, _) in self._deadlines.items() if deadline < now]
                calls = [self._deadlines.pop(key)[1] for key in expired]
            for call in calls:
                call.cancel()


WATCHDOG = StreamWatchdog()

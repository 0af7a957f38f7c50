"""gRPC channels to peers, one per announced endpoint, and conversion of gRPC failures into RemoteError."""

import threading
import time

import grpc

from swarm.dht_records import PeerSpan
from swarm.errors import RemoteError
from swarm.net.endpoints import Endpoint, secure_channel
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc


class PeerConnections:
    """One TLS channel per announced peer endpoint (pinned to its certificate; direct or through its relay)."""

    def __init__(self, max_message_bytes: int):
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._stubs: dict[Endpoint, pb_grpc.SwarmPeerStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def stub(self, peer: PeerSpan) -> pb_grpc.SwarmPeerStub:
        endpoint = peer.endpoint
        with self._lock:
            if endpoint not in self._stubs:
                try:
                    channel = secure_channel(endpoint, self._options)
                except ValueError as error:  # a record without certificate or address: nothing to dial
                    raise RemoteError(peer.peer_id, "UNAVAILABLE", str(error)) from None
                self._channels.append(channel)
                self._stubs[endpoint] = pb_grpc.SwarmPeerStub(channel)
            return self._stubs[endpoint]

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
        self._fired: set[int] = set()  # calls this watchdog cancelled (their error says CANCELLED, not why)
        self._lock = threading.Lock()
        self._tick = tick
        threading.Thread(target=self._watch, name="swarm-stream-watchdog", daemon=True).start()

    def arm(self, call, timeout: float) -> None:
        with self._lock:
            self._deadlines[id(call)] = (time.monotonic() + timeout, call)

    def disarm(self, call) -> bool:
        """Stops watching the call; True if it was cancelled for waiting past its deadline."""
        with self._lock:
            self._deadlines.pop(id(call), None)
            if id(call) in self._fired:
                self._fired.discard(id(call))
                return True
            return False

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:  # cancelling under the lock: once disarm() returns, this arming can no longer fire
                for key in [key for key, (deadline, _) in self._deadlines.items() if deadline < now]:
                    self._deadlines.pop(key)[1].cancel()  # only signals gRPC's core: does not block
                    self._fired.add(key)


WATCHDOG = StreamWatchdog()

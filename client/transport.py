"""gRPC channels to peers, one per address, and conversion of gRPC failures into RemoteError."""

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from swarm.errors import RemoteError
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

T = TypeVar("T")


class PeerConnections:
    def __init__(self, max_message_bytes: int):
        self._options = _channel_options(max_message_bytes)
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


class SessionTransport:
    """An inference session's own event loop and gRPC asyncio channels, one per peer address.

    The session's thread runs the loop only while it waits for an answer (`run`), so a step is written and its
    answer read on the calling thread: the sync API would hand each message to a request-consumer thread and each
    answer over from a channel thread. Against a bare echo server on loopback (this VM): 0.23-0.32 vs 0.25-0.45 ms
    per round trip, 0.14-0.20 vs 0.17-0.31 ms of client CPU per step; the thread wake-ups saved cost most when the
    machine is busy.
    """

    def __init__(self, max_message_bytes: int):
        self._options = _channel_options(max_message_bytes)
        self._loop: asyncio.AbstractEventLoop | None = _IDLE_LOOPS.take()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def stub(self, address: str) -> pb_grpc.SwarmPeerStub:
        if address not in self._channels:
            self._channels[address] = self.run(self._connect(address))
        return pb_grpc.SwarmPeerStub(self._channels[address])

    async def _connect(self, address: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=self._options)  # binds the channel to this loop

    def close(self) -> None:
        if self._loop is None:
            return
        self.run(self._close_channels())
        _IDLE_LOOPS.give_back(self._loop)
        self._loop = None

    async def _close_channels(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))
        self._channels.clear()


class _LoopPool:
    """Event loops for sessions, reused and never closed: gRPC's asyncio poller keeps every loop it has served and
    may still post a late event (a cancelled call's completion) into one, which a closed loop refuses noisily
    ("Event loop is closed"). At most as many loops exist as sessions were ever open at once."""

    def __init__(self):
        self._idle: list[asyncio.AbstractEventLoop] = []
        self._lock = threading.Lock()

    def take(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            return self._idle.pop() if self._idle else asyncio.new_event_loop()

    def give_back(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._idle.append(loop)


_IDLE_LOOPS = _LoopPool()


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]

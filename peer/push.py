"""Steps pushed straight to the next peer of a chain: a decode step then crosses each link once, instead of going
back to the client and out again (one network hop and one client wake-up less per peer)."""

import asyncio
import logging
import time

import grpc

from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Longest wait for a push to be handed to the transport (a new stream waits for its connection): past it the push
# counts as failed and the client sends the step itself.
PUSH_TIMEOUT = 2.0
# A peer we failed to push to is not tried again for this long: its steps go through the client meanwhile.
UNREACHABLE_SECONDS = 60.0


class _PushStream:
    """One client stream of the Push RPC to one peer, shared by every session whose chain goes there next."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self.call = pb_grpc.SwarmPeerStub(channel).Push()
        self.lock = asyncio.Lock()  # a gRPC stream takes one write at a time


class PushSender:
    """Keeps a push stream per next peer; call from the peer's event loop."""

    def __init__(self, max_message_bytes: int):
        self._options = [("grpc.max_send_message_length", max_message_bytes)]
        self._streams: dict[str, _PushStream] = {}
        self._unreachable_until: dict[str, float] = {}

    async def push(self, target: pb.PushTarget, step: pb.InferenceStep) -> bool:
        """Sends `step` to `target`'s peer; False if it could not be handed over (the caller's client sends it)."""
        address = target.address
        if self._unreachable_until.get(address, 0.0) > time.monotonic():
            return False
        stream = self._streams.get(address)
        if stream is None:
            stream = self._streams[address] = _PushStream(grpc.aio.insecure_channel(address, options=self._options))
        try:
            async with stream.lock, asyncio.timeout(PUSH_TIMEOUT):
                await stream.call.write(step)
            return True
        except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError) as error:
            logger.info(f"cannot push to {address}, its steps go through the client for a while: {error!r}")
            self._unreachable_until[address] = time.monotonic() + UNREACHABLE_SECONDS
            await self._drop(address)
            return False

    async def _drop(self, address: str) -> None:
        stream = self._streams.pop(address, None)
        if stream is not None:
            stream.call.cancel()
            await stream.channel.close()

    async def close(self) -> None:
        for address in list(self._streams):
            await self._drop(address)

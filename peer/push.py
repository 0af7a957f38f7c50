"""Steps pushed straight to the next peer of a chain: a decode step then crosses each link once, instead of going
back to the client and out again (one network hop and one client wake-up less per peer).

A push goes only to a peer that the swarm's records announce for the next block, over TLS pinned to its announced
certificate, directly or through its relay (see peer.directory and swarm.net.endpoints)."""

import asyncio
import logging
import time

import grpc

from swarm.net.endpoints import Endpoint, aio_secure_channel
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
    """Keeps a push stream per next peer (by its announced endpoint); call from the peer's event loop."""

    def __init__(self, max_message_bytes: int):
        self._options = [("grpc.max_send_message_length", max_message_bytes)]
        self._streams: dict[Endpoint, _PushStream] = {}
        self._unreachable_until: dict[Endpoint, float] = {}

    async def push(self, endpoint: Endpoint, step: pb.InferenceStep) -> bool:
        """Sends `step` to the peer at `endpoint`; False if it could not be handed over (the caller's client sends it)."""
        if self._unreachable_until.get(endpoint, 0.0) > time.monotonic():
            return False
        try:
            stream = self._streams.get(endpoint)
            if stream is None:
                stream = self._streams[endpoint] = _PushStream(aio_secure_channel(endpoint, self._options))
            async with stream.lock, asyncio.timeout(PUSH_TIMEOUT):
                await stream.call.write(step)
            return True
        except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError, ValueError) as error:  # ValueError: no address
            logger.info(f"cannot push to {endpoint.describe()}, its steps go through the client for a while: {error!r}")
            self._unreachable_until[endpoint] = time.monotonic() + UNREACHABLE_SECONDS
            await self._drop(endpoint)
            return False

    async def _drop(self, endpoint: Endpoint) -> None:
        stream = self._streams.pop(endpoint, None)
        if stream is not None:
            stream.call.cancel()
            await stream.channel.close()

    async def close(self) -> None:
        for endpoint in list(self._streams):
            await self._drop(endpoint)

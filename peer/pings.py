"""Round trips from this peer to the peers that serve the block after its span (announced for routing/monitoring)."""

import asyncio
import time

import grpc

from swarm.dht_records import PeerSpan, ServerState
from swarm.net.endpoints import Endpoint, aio_secure_channel
from swarm.wire import swarm_peer_pb2 as pb
from swarm.wire import swarm_peer_pb2_grpc as pb_grpc

MAX_PINGED = 5
PING_TIMEOUT = 2.0


async def ping(endpoint: Endpoint) -> float | None:
    """Seconds for an Info round trip on a warm connection (the first call pays for connecting), None if down."""
    try:
        channel = aio_secure_channel(endpoint)
    except ValueError:  # announced no certificate or address
        return None
    async with channel:
        stub = pb_grpc.SwarmPeerStub(channel)
        try:
            await stub.Info(pb.InfoRequest(), timeout=PING_TIMEOUT)
            started = time.perf_counter()
            await stub.Info(pb.InfoRequest(), timeout=PING_TIMEOUT)
        except grpc.aio.AioRpcError:
            return None
        return time.perf_counter() - started


async def ping_successors(spans: list[PeerSpan], own_id: str, end_block: int) -> dict[str, float]:
    """Pings (at most MAX_PINGED of) the peers that hold block `end_block`, where a chain through us goes next."""
    successors = [
        span for span in spans
        if span.peer_id != own_id and span.record.state == ServerState.ONLINE and span.start <= end_block < span.end
    ][:MAX_PINGED]  # a peer still joining has no address yet
    rtts = await asyncio.gather(*(ping(span.endpoint) for span in successors))
    return {span.peer_id: rtt for span, rtt in zip(successors, rtts) if rtt is not None}

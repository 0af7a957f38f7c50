"""`python -m tests.slow_peer serve ...`: the real peer CLI with every answer delayed (a test fixture for routing).

$SWARM_TEST_PEER_DELAY: seconds added to each answer. $SWARM_TEST_BOAST: a throughput to announce instead of the
measured one, with only inference steps delayed (its pings are quick): a peer that lies about its speed. The delay
and the lie are added here, around the real code, so that production code carries no test hooks.
"""

import asyncio
import os

from peer import handler, server
from peer.cli import main

DELAY = float(os.environ.get("SWARM_TEST_PEER_DELAY", "0.05"))
BOAST = os.environ.get("SWARM_TEST_BOAST")


def _delayed(method):
    async def slowed(self, request, context):
        await asyncio.sleep(DELAY)
        return await method(self, request, context)

    return slowed


_honest_next_request = handler.SwarmPeerServicer._next_request


async def _slow_next_request(self, requests, context, session=None):
    request = await _honest_next_request(self, requests, context, session)
    await asyncio.sleep(DELAY)
    return request


if BOAST is None:
    for name in ("Info", "Forward", "Backward"):
        setattr(handler.SwarmPeerServicer, name, _delayed(getattr(handler.SwarmPeerServicer, name)))
else:
    server.Peer.throughput = property(lambda _: float(BOAST))
handler.SwarmPeerServicer._next_request = _slow_next_request

if __name__ == "__main__":
    main()

"""`python -m tests.slow_peer serve ...`: the real peer CLI with every answer delayed (a test fixture for routing).

The delay is added here, around the real handlers, so that production code carries no test hooks.
"""

import asyncio
import os

from peer import handler
from peer.cli import main

DELAY = float(os.environ.get("SWARM_TEST_PEER_DELAY", "0.05"))


def _delayed(method):
    async def slowed(self, request, context):
        await asyncio.sleep(DELAY)
        return await method(self, request, context)

    return slowed


async def _slow_next_request(self, requests, context, _original=handler.SwarmPeerServicer._next_request):
    request = await _original(self, requests, context)
    await asyncio.sleep(DELAY)
    return request


for name in ("Info", "Forward", "Backward"):
    setattr(handler.SwarmPeerServicer, name, _delayed(getattr(handler.SwarmPeerServicer, name)))
handler.SwarmPeerServicer._next_request = _slow_next_request

if __name__ == "__main__":
    main()

"""The one thread that owns the device: runs compute jobs queued by the asyncio handlers, inference first."""

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1


class ComputeRuntime:
    def __init__(self, name: str = "swarm-compute"):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # keeps FIFO order among jobs of equal priority
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, priority: int, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((priority, next(self._order), function, args, loop, future))
        return await future

    def shutdown(self) -> None:
        self._jobs.put((-1, -1, None, (), None, None))
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            _, _, function, args, loop, future = self._jobs.get()
            if function is None:
                return
            try:
                result, error = function(*args), None
            except BaseException as exception:  # handed to the waiting handler, which decides what the client sees
                result, error = None, exception
            loop.call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

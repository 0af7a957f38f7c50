"""A fixed budget of KV-cache memory shared by the sessions of one peer."""

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CacheExhaustedError(Exception):
    """No room for a session's cache within the timeout, or more than the whole pool was asked for."""


class CachePool:
    """Counts bytes reserved for KV caches; sessions wait (up to a timeout) while the pool is full."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._freed = asyncio.Condition()

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @contextlib.asynccontextmanager
    async def reserve(self, num_bytes: int, timeout: float) -> AsyncIterator[None]:
        if num_bytes > self.capacity_bytes:
            raise CacheExhaustedError(
                f"the session needs {num_bytes} bytes of cache but this peer's whole pool is {self.capacity_bytes}; "
                "ask for a smaller max_length or batch"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: num_bytes <= self.free_bytes), timeout)
            except TimeoutError:
                raise CacheExhaustedError(
                    f"the cache pool stayed full for {timeout:.1f}s ({self.free_bytes} of {self.capacity_bytes} bytes "
                    f"free, {num_bytes} needed); try again later or use another peer"
                ) from None
            self.used_bytes += num_bytes
        try:
            yield
        finally:
            async with self._freed:
                self.used_bytes -= num_bytes
                self._freed.notify_all()

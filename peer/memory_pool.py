"""The budget of KV-cache pages shared by the sessions of one peer."""

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CacheExhaustedError(Exception):
    """No room for a session's cache within the timeout, or more than the whole pool was asked for."""


class CachePool:
    """Hands out page numbers of the peer's PagedKV; sessions wait (up to a timeout) while too few are free."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages))
        self._freed = asyncio.Condition()

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @contextlib.asynccontextmanager
    async def reserve(self, num_pages: int, timeout: float) -> AsyncIterator[list[int]]:
        if num_pages > self.num_pages:
            raise CacheExhaustedError(
                f"the session needs {num_pages * self.page_size} tokens of cache but this peer's whole pool holds "
                f"{self.num_pages * self.page_size}; ask for a smaller max_length or batch"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: num_pages <= len(self._free)), timeout)
            except TimeoutError:
                raise CacheExhaustedError(
                    f"the cache pool stayed full for {timeout:.1f}s ({self.free_tokens} of "
                    f"{self.num_pages * self.page_size} tokens free, {num_pages * self.page_size} needed); "
                    "try again later or use another peer"
                ) from None
            pages, self._free = self._free[:num_pages], self._free[num_pages:]
        try:
            yield pages
        finally:
            async with self._freed:
                self._free.extend(pages)
                self._freed.notify_all()

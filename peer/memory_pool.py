"""The budget of KV-cache pages shared by the sessions of one peer."""

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class CacheExhaustedError(Exception):
    """No room for a session's cache within the timeout, or more than the whole pool was asked for."""


@dataclass(eq=False)
class _Waiter:
    num_pages: int
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class CachePool:
    """Hands out page numbers of the peer's PagedKV, first come first served: a session that waits (up to its
    timeout) for room is served before any that asked after it, so a stream of small sessions cannot starve a large
    one. A timeout of 0 takes room that is free now, or fails at once."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages))
        self._waiting: deque[_Waiter] = deque()

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
        if not self._waiting and num_pages <= len(self._free):
            pages = self._take(num_pages)
        else:
            pages = await self._wait_in_line(num_pages, timeout)
        try:
            yield pages
        finally:
            self._free.extend(pages)
            self._serve_waiting()

    async def _wait_in_line(self, num_pages: int, timeout: float) -> list[int]:
        waiter = _Waiter(num_pages)
        self._waiting.append(waiter)
        try:
            return await asyncio.wait_for(waiter.granted, timeout)
        except BaseException as error:  # timed out, or the request was cancelled while waiting
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            if waiter.granted.done() and not waiter.granted.cancelled():  # granted just as it gave up: give back
                self._free.extend(waiter.granted.result())
            self._serve_waiting()  # whoever waited behind it may fit now
            if isinstance(error, TimeoutError):
                raise CacheExhaustedError(
                    f"the cache pool stayed full for {timeout:.1f}s ({self.free_tokens} of "
                    f"{self.num_pages * self.page_size} tokens free, {num_pages * self.page_size} needed, "
                    f"{len(self._waiting)} session(s) waiting); try again later or use another peer"
                ) from None
            raise

    def _serve_waiting(self) -> None:
        """Grants room to waiting sessions in the order they came, as long as the first of them fits."""
        while self._waiting and self._waiting[0].num_pages <= len(self._free):
            waiter = self._waiting.popleft()
            if not waiter.granted.done():
                waiter.granted.set_result(self._take(waiter.num_pages))

    def _take(self, num_pages: int) -> list[int]:
        pages, self._free = self._free[:num_pages], self._free[num_pages:]
        return pages

"""Something opened the first time it is needed, at most once however many callers race."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class OnDemand(Generic[T]):
    """A reply inbox, an ack listener, a channel: ``await get()`` opens it through ``open()``
    on first use (callers arriving meanwhile wait for the same opening), then returns it
    without a lock. :meth:`reset` forgets it (after a reconnect, or close), so the next
    ``get()`` opens a new one."""

    __slots__ = ("_lock", "_open", "value")

    def __init__(self, open: Callable[[], Awaitable[T]]) -> None:
        self._open = open
        self._lock: asyncio.Lock | None = None
        self.value: T | None = None

    async def get(self) -> T:
        value = self.value
        if value is not None:
            return value
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.value is None:
                self.value = await self._open()
            return self.value

    def reset(self) -> None:
        self.value = None

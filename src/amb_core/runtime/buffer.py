"""A bounded FIFO with waiting readers and writers: the queue under every pump and channel."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Buffer(Generic[T]):
    """A bounded FIFO for one reader or several (a group's members take turns).

    ``asyncio.Queue`` does the same with more bookkeeping per item; this sits on every adapter's
    hot path. With several readers, one that takes an item while more are waiting wakes an idle
    reader for the next; a reader that then yields once per item (the in-memory broker's group
    members do) shares the load even when its handler never suspends.
    """

    __slots__ = ("_getters", "_items", "_maxsize", "_putters")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a buffer holds at least one item")
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def full(self) -> bool:
        return len(self._items) >= self._maxsize

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def offer(self, item: T) -> bool:
        """Append without waiting; False when full."""
        if len(self._items) >= self._maxsize:
            return False
        self._items.append(item)
        if self._getters:
            self._wake(self._getters)
        return True

    async def put(self, item: T) -> None:
        """Append, waiting while the buffer is full (backpressure on the writer)."""
        while len(self._items) >= self._maxsize:
            await self._wait(self._putters)
        self._items.append(item)
        if self._getters:
            self._wake(self._getters)

    def poll(self) -> T | None:
        """The next item without waiting, or None when empty."""
        if not self._items:
            return None
        item = self._items.popleft()
        if self._putters:
            self._wake(self._putters)
        if self._items and self._getters:
            self._wake(self._getters)  # more left: an idle reader takes the next one
        return item

    async def get(self) -> T:
        while not self._items:
            await self._wait(self._getters)
        item = self._items.popleft()
        if self._putters:
            self._wake(self._putters)
        if self._items and self._getters:
            self._wake(self._getters)
        return item

    def clear(self) -> None:
        self._items.clear()
        while self._putters:
            self._wake(self._putters)

    async def _wait(self, waiters: deque[asyncio.Future[None]]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake(waiters)  # pass the wake-up on to the next waiter
            raise

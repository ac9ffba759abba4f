"""Timeouts on one timer, and the table of requests waiting for their reply."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from amb_core.errors import RequestTimeout

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Deadlines:
    """Timeouts of many futures on one event-loop timer.

    ``loop.call_later`` per publish or request, then cancelling it, was a visible share of
    either: a TimerHandle, a push on the loop's heap and a cancel each time. Here a future and
    what to do if it is still pending at its deadline go on our own heap; one timer, for the
    earliest deadline, expires what is due. Settled futures are dropped as they surface, and
    in bulk every ``_PRUNE_EVERY`` additions, so the heap holds about what is pending.
    """

    _PRUNE_EVERY = 1024

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[Any],
                               Callable[[asyncio.Future[Any]], None]]] = []
        self._sequence = itertools.count()
        self._added = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, timeout: float, future: asyncio.Future[Any],
            expire: Callable[[asyncio.Future[Any]], None]) -> None:
        """``expire(future)`` runs at ``timeout`` seconds from now if ``future`` is not done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        heapq.heappush(self._heap, (deadline, next(self._sequence), future, expire))
        self._added += 1
        if self._added >= self._PRUNE_EVERY:
            self._added = 0
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
        if self._timer is None or deadline < self._timer_at:
            self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # the loop may run a timer a hair early: no spinning on it
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, future, expire = heapq.heappop(heap)
            if not future.done():
                expire(future)
        self._schedule(loop)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def __len__(self) -> int:
        """Futures still pending (for tests)."""
        return sum(1 for entry in self._heap if not entry[2].done())


class PendingReplies(Generic[K, V]):
    """Requests waiting for their reply, by key (a request id, a correlation id).

    :meth:`expect` registers a key and returns the future its reply resolves; at its deadline a
    still-pending future fails with :class:`RequestTimeout`. A reply for a key nobody waits
    for any more (it timed out) is refused by :meth:`resolve`, never delivered elsewhere.
    """

    __slots__ = ("_deadlines", "_futures")

    def __init__(self) -> None:
        self._futures: dict[K, asyncio.Future[V]] = {}
        self._deadlines = Deadlines()

    def __len__(self) -> int:
        return len(self._futures)

    def __contains__(self, key: object) -> bool:
        return key in self._futures

    def expect(self, key: K, timeout: float, what: str) -> asyncio.Future[V]:
        """A future for the reply to ``key``; ``what`` names the request in the timeout's text
        (``"'calculate'"`` gives "no reply to 'calculate' within 30.0s")."""
        if key in self._futures:
            raise ValueError(f"a request keyed {key!r} is already waiting for its reply")
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._futures[key] = future

        def expire(late: asyncio.Future[Any]) -> None:
            late.set_exception(RequestTimeout(f"no reply to {what} within {timeout}s"))
            if self._futures.get(key) is late:
                del self._futures[key]

        self._deadlines.add(timeout, future, expire)
        return future

    def resolve(self, key: K, value: V) -> bool:
        """Hand ``value`` to whoever waits for ``key``; False when nobody does (any more)."""
        future = self._futures.pop(key, None)
        if future is None or future.done():
            return False
        future.set_result(value)
        return True

    def discard(self, key: K) -> None:
        """The request is over (answered, failed or cancelled): forget it, and cancel its
        future if nobody resolved it (so no timeout is raised that nobody reads)."""
        future = self._futures.pop(key, None)
        if future is not None and not future.done():
            future.cancel()

    def fail_all(self, exc: BaseException) -> None:
        """Every waiting request fails with ``exc`` (close, lost connection)."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(exc)
        self._deadlines.clear()

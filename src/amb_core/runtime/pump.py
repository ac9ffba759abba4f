"""A bounded buffer and the one task that empties it, in order: the shape of every subscription.

Two ways in, one per delivery guarantee:

- :meth:`Pump.put` waits while the buffer is full. Used where the adapter can stop taking
  messages (pull consumers, the in-memory broker): the broker keeps what we do not take, or the
  publisher slows down.
- :meth:`Pump.offer` never waits: a full buffer drops the message and the :class:`DropReport`
  says so. Used only where the server pushes regardless and the path is at-most-once anyway
  (Redis pub/sub, core NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from amb_core.runtime.buffer import Buffer

T = TypeVar("T")

logger = logging.getLogger(__name__)


class DropReport:
    """The slow-consumer report, the same on every adapter: a warning at the first drop, then
    at most one every ``interval`` seconds saying how many were dropped since the last one.
    ``dropped`` counts them all."""

    __slots__ = ("_hint", "_interval", "_last", "_since", "_what", "dropped")

    def __init__(self, what: str, hint: str = "", interval: float = 5.0) -> None:
        self._what = what
        self._hint = hint
        self._interval = interval
        self._last = float("-inf")
        self._since = 0
        self.dropped = 0

    def dropped_one(self) -> None:
        self.dropped += 1
        self._since += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            logger.warning(
                "slow consumer on %s: its buffer is full, %d message(s) dropped (%d in all; "
                "at-most-once delivery%s)",
                self._what, self._since, self.dropped, f"; {self._hint}" if self._hint else "",
            )
            self._last = now
            self._since = 0


class Pump(Generic[T]):
    """A :class:`Buffer` of ``max_items`` (and, when ``max_bytes`` is set, of that many bytes
    as the writer counts them) and one task calling ``deliver(item)`` for each, in order.

    ``deliver`` returns once the bus has taken the item (it blocks while the subscription's
    handlers are all busy), so a slow handler fills the buffer, not memory. An exception from
    ``deliver`` is a bug below the bus: it is logged and the pump goes on. Without a byte bound
    items are buffered as they are (no wrapper per item).
    """

    __slots__ = ("_bytes", "_deliver", "_max_bytes", "_name", "_sizes", "_task", "buffer",
                 "report")

    def __init__(
        self,
        deliver: Callable[[T], Awaitable[None]],
        *,
        max_items: int,
        name: str,
        max_bytes: int = 0,
        hint: str = "",
    ) -> None:
        self.buffer: Buffer[T] = Buffer(max_items)
        self.report = DropReport(name, hint)
        self._deliver = deliver
        self._name = name
        self._max_bytes = max_bytes
        self._bytes = 0
        self._sizes: deque[int] = deque()  # per buffered item, only with a byte bound
        self._task = asyncio.get_running_loop().create_task(self._run())

    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def dropped(self) -> int:
        return self.report.dropped

    def offer(self, item: T, nbytes: int = 0) -> bool:
        """Take ``item`` if there is room; else drop it, report, and return False."""
        if self._max_bytes:
            if self._bytes >= self._max_bytes or not self.buffer.offer(item):
                self.report.dropped_one()
                return False
            self._sizes.append(nbytes)
            self._bytes += nbytes
            return True
        if not self.buffer.offer(item):
            self.report.dropped_one()
            return False
        return True

    async def put(self, item: T, nbytes: int = 0) -> None:
        """Take ``item``, waiting for room first (backpressure)."""
        await self.buffer.put(item)
        if self._max_bytes:
            self._sizes.append(nbytes)
            self._bytes += nbytes

    async def _run(self) -> None:
        buffer, deliver, sizes = self.buffer, self._deliver, self._sizes
        while True:
            item = buffer.poll()
            if item is None:
                item = await buffer.get()
            if sizes:
                self._bytes -= sizes.popleft()
            try:
                await deliver(item)
            except Exception:
                logger.exception("delivery from %s failed below the bus", self._name)

    def clear(self) -> None:
        """Forget what is buffered (a subscription restarting after a reconnect)."""
        self.buffer.clear()
        self._sizes.clear()
        self._bytes = 0

    async def close(self) -> None:
        """Stop the task (a delivery in progress is cancelled) and drop what is buffered."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.clear()

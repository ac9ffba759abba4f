"""Acknowledgements gathered over one event-loop turn and sent as one batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class AckBatcher(Generic[T]):
    """Collects acks (delivery tags, stream entry ids, receipt handles) and sends them together.

    :meth:`add` costs an append; the first add of a turn schedules one call of ``send(batch)``
    for the end of the turn (``loop.call_soon``), with the batch in the order added, cut at
    ``max_batch`` (SQS and Service Bus take at most 10 per call). ``send`` may be a plain
    function that writes at once, or a coroutine function: batches are then sent one after the
    other, never overlapping, so acks reach the broker in order. A failing send is logged: an
    ack lost means a redelivery, which at-least-once delivery allows.
    """

    __slots__ = ("_closed", "_items", "_max_batch", "_name", "_scheduled", "_send", "_sending",
                 "sent")

    def __init__(self, send: Callable[[list[T]], Awaitable[None] | None], *, name: str,
                 max_batch: int = 0) -> None:
        self._send = send
        self._name = name
        self._max_batch = max_batch
        self._items: list[T] = []
        self._scheduled = False
        self._sending: asyncio.Task[None] | None = None
        self._closed = False
        self.sent = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if self._closed:
            logger.debug("%s: ack after close dropped; the broker redelivers", self._name)
            return
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items or (self._sending is not None and not self._sending.done()):
            return  # a send in progress picks them up when it is done
        items, self._items = self._items, []
        batches = self._cut(items)
        for index, batch in enumerate(batches):
            awaitable = self._call(batch)
            if awaitable is not None:
                self._sending = asyncio.get_running_loop().create_task(
                    self._finish(awaitable, batches[index + 1:])
                )
                return

    def _cut(self, items: list[T]) -> list[list[T]]:
        size = self._max_batch
        if not size or len(items) <= size:
            return [items]
        return [items[i:i + size] for i in range(0, len(items), size)]

    def _call(self, batch: list[T]) -> Awaitable[None] | None:
        try:
            result = self._send(batch)
        except Exception:
            self._failed(len(batch))
            return None
        self.sent += len(batch)
        return result

    def _failed(self, count: int) -> None:
        logger.warning("%s: sending %d ack(s) failed; the broker may redeliver them",
                       self._name, count, exc_info=True)

    async def _finish(self, current: Awaitable[None], rest: list[list[T]]) -> None:
        """Wait for a coroutine send, then send the batches cut after it, one at a time."""
        batches = iter(rest)
        awaitable: Awaitable[None] | None = current
        while True:
            if awaitable is not None:
                try:
                    await awaitable
                except Exception:
                    self._failed(0)
            batch = next(batches, None)
            if batch is None:
                break
            awaitable = self._call(batch)
        if self._items and not self._scheduled:  # added while we were sending
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def flush(self) -> None:
        """Send what is gathered now and wait until every batch so far is sent."""
        while self._items or (self._sending is not None and not self._sending.done()):
            if self._sending is not None and not self._sending.done():
                await self._sending
                continue
            self._flush()

    async def close(self, timeout: float = 5.0) -> None:
        """Flush (for at most ``timeout`` seconds: a send stuck on a dead connection must not
        hang a close), then take no more (an ack after close stays unsent: a redelivery)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout)
        self._closed = True

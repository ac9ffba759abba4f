"""Sends of one event-loop turn gathered into batch calls (SNS PublishBatch, SQS
SendMessageBatch: at most 10 entries, and a byte bound per call).

Each :meth:`Batches.send` waits for its own entry's outcome, so a publish still returns once SQS
or SNS has the message; many tasks publishing at once share calls. A lone publisher pays the
same single round trip as before (a batch of one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

SendBatch = Callable[[str, list[dict[str, Any]]], Awaitable[dict[str, Any]]]
"""``send(destination, entries)`` -> the service's response (``Successful``, ``Failed``)."""
Failure = Callable[[str, dict[str, Any]], BaseException]


class Batches:
    """``ordered``: the batches of one destination are sent one after the other (FIFO topics:
    concurrent calls could land in either order); else they overlap."""

    __slots__ = ("_fail", "_last", "_max_bytes", "_pending", "_scheduled", "_send", "_tasks",
                 "ordered")

    def __init__(self, send: SendBatch, fail: Failure, *, max_bytes: int,
                 ordered: bool = False) -> None:
        self.ordered = ordered
        self._last: dict[str, asyncio.Task[None]] = {}
        self._send = send
        self._fail = fail
        self._max_bytes = max_bytes
        self._pending: dict[str, list[tuple[dict[str, Any], int, asyncio.Future[None]]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, destination: str, entry: dict[str, Any], size: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        pending = self._pending.get(destination)
        if pending is None:
            pending = self._pending[destination] = []
        pending.append((entry, size, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for destination, items in pending.items():
            batch: list[tuple[dict[str, Any], int, asyncio.Future[None]]] = []
            total = 0
            for item in items:
                if batch and (len(batch) == 10 or total + item[1] > self._max_bytes):
                    self._start(loop, destination, batch)
                    batch, total = [], 0
                batch.append(item)
                total += item[1]
            if batch:
                self._start(loop, destination, batch)

    def _start(self, loop: asyncio.AbstractEventLoop, destination: str,
               batch: list[tuple[dict[str, Any], int, asyncio.Future[None]]]) -> None:
        previous = self._last.get(destination) if self.ordered else None
        task = loop.create_task(self._call(destination, batch, previous))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.ordered:
            self._last[destination] = task
            task.add_done_callback(lambda done: self._forget(destination, done))

    def _forget(self, destination: str, task: asyncio.Task[None]) -> None:
        if self._last.get(destination) is task:
            del self._last[destination]

    async def _call(self, destination: str,
                    batch: list[tuple[dict[str, Any], int, asyncio.Future[None]]],
                    previous: asyncio.Task[None] | None = None) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        entries = []
        for index, (entry, _, _) in enumerate(batch):
            entry["Id"] = str(index)
            entries.append(entry)
        try:
            response = await self._send(destination, entries)
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for failed in response.get("Failed") or ():
            future = batch[int(failed["Id"])][2]
            if not future.done():
                future.set_exception(self._fail(destination, failed))
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        """Wait for the batches in flight (their publishers are waiting for them anyway)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""Keep the leases of in-flight messages alive while their handlers run.

Pull brokers lend a message for a while and give it to another consumer when that runs out:
JetStream's ``ack_wait``, a Redis group's ``claim_idle``, an SQS visibility timeout, a Service
Bus lock. A handler may take longer than that. The :class:`LeaseKeeper` of a subscription
tracks what it holds and, on one timer, renews every lease held for ``renew_after`` seconds
since its last renewal, in one batch (brokers that can renew many at once do so in one call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


class LeaseKeeper(Generic[K]):
    """Leases by key (an ack subject, a stream entry id, a receipt handle).

    :meth:`hold` when a message is handed to the bus, :meth:`release` when it is settled
    (acked, nak'ed, dead-lettered). ``renew(keys)`` is called with the leases held for
    ``renew_after`` seconds or more since they were taken or last renewed; it must renew them
    all (or raise: the error is logged and they are tried again on the next tick). Leases are
    renewed between ``renew_after`` and ``1.5 * renew_after`` after the previous renewal, so
    ``renew_after`` should be at most half the broker's lease time.
    """

    __slots__ = ("_closed", "_held", "_name", "_renew", "_renew_after", "_task", "_wake",
                 "renewals")

    def __init__(self, renew: Callable[[list[K]], Awaitable[None]], *, renew_after: float,
                 name: str) -> None:
        if renew_after <= 0:
            raise ValueError("renew_after must be positive")
        self._renew = renew
        self._renew_after = renew_after
        self._name = name
        self._held: dict[K, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self.renewals = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def hold(self, key: K, since: float | None = None) -> None:
        """Track ``key``, whose lease was taken or last renewed at ``since`` (``time.monotonic``
        seconds; default now: pass the read time for messages that waited, read ahead)."""
        if self._closed:
            raise RuntimeError(f"{self._name}: the lease keeper is closed")
        self._held[key] = time.monotonic() if since is None else since
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif len(self._held) == 1 and self._wake is not None:
            self._wake.set()

    def release(self, key: K) -> bool:
        """True if ``key`` was held (False: already released, or never held here)."""
        return self._held.pop(key, None) is not None

    def release_all(self) -> list[K]:
        """Give up every lease (closing); returns the keys that were held."""
        held = list(self._held)
        self._held.clear()
        return held

    async def _run(self) -> None:
        tick = self._renew_after / 2
        assert self._wake is not None
        while True:
            if not self._held:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(tick)
            now = time.monotonic()
            due = [key for key, since in self._held.items() if now - since >= self._renew_after]
            if not due:
                continue
            try:
                await self._renew(due)
            except Exception:
                logger.warning("renewing %d lease(s) of %s failed; retrying", len(due),
                               self._name, exc_info=True)
                continue
            self.renewals += len(due)
            renewed = time.monotonic()
            for key in due:
                if key in self._held:
                    self._held[key] = renewed

    async def close(self) -> None:
        """Stop renewing, for good (a closed keeper refuses :meth:`hold`)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

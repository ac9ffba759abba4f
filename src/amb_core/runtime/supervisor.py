"""Connect, notice the loss, reconnect with capped exponential backoff, restore: once for all.

Every adapter takes the same options (:class:`ReconnectPolicy`), logs the same lines (a
warning when a connection is lost, one INFO line per reconnect) and restores what rides on a
connection (subscriptions, inboxes) in the ``open`` step it hands to the :class:`Supervisor`.
Adapters whose client library reconnects by itself (nats-py) use only the policy's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amb_core.errors import BrokerConnectionError, NotConnected

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How an adapter reconnects after losing its broker.

    The n-th attempt waits ``initial_delay * multiplier ** (n - 1)``, capped at ``max_delay``,
    each delay spread by ``jitter`` (0.2: up to 20% either way) so that many clients of one
    restarted broker do not come back in lock step. ``connect_timeout`` bounds each attempt
    (and the first connect). ``max_attempts`` None: try for as long as the adapter is open.
    """

    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    connect_timeout: float = 5.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        if self.multiplier < 1 or not 0 <= self.jitter < 1 or self.connect_timeout <= 0:
            raise ValueError("need multiplier >= 1, 0 <= jitter < 1, connect_timeout > 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be None or at least 1")

    def backoff(self) -> Backoff:
        return Backoff(self)


class Backoff:
    """The delays of one run of attempts; :meth:`reset` after a success."""

    __slots__ = ("_policy", "attempts")

    def __init__(self, policy: ReconnectPolicy) -> None:
        self._policy = policy
        self.attempts = 0

    def next_delay(self) -> float:
        policy = self._policy
        base = min(policy.initial_delay * policy.multiplier ** self.attempts, policy.max_delay)
        self.attempts += 1
        if policy.jitter:
            base *= 1.0 + random.uniform(-policy.jitter, policy.jitter)
        return base

    @property
    def exhausted(self) -> bool:
        limit = self._policy.max_attempts
        return limit is not None and self.attempts >= limit

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempts = 0


class Supervisor:
    """Keeps one connection of an adapter up.

    ``open()`` makes the connection and restores everything that rides on it (it raises on
    failure; the supervisor cleans up by calling ``discard()``). ``until_lost()`` returns or
    raises once the connection is gone. ``on_lost(exc)`` runs when it is (fail pending
    requests, say). The first :meth:`start` raises :class:`BrokerConnectionError` if the broker
    cannot be reached within the policy's ``connect_timeout``; later losses are retried in the
    background with the policy's backoff, and :meth:`wait_ready` lets callers wait, bounded.
    """

    def __init__(
        self,
        name: str,
        *,
        open: Callable[[], Awaitable[None]],
        until_lost: Callable[[], Awaitable[None]],
        discard: Callable[[], Awaitable[None]] | None = None,
        on_lost: Callable[[BaseException | None], None] | None = None,
        policy: ReconnectPolicy | None = None,
        errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError),
    ) -> None:
        self.name = name
        self.policy = policy or ReconnectPolicy()
        self.ready = asyncio.Event()
        self.reconnects = 0
        self.gave_up = False
        self._open = open
        self._until_lost = until_lost
        self._discard = discard
        self._on_lost = on_lost
        self._errors: tuple[type[BaseException], ...] = (*errors, asyncio.TimeoutError)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        state = "ready" if self.ready.is_set() else "reconnecting" if self._task else "idle"
        return f"<Supervisor {self.name} {state}>"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    async def start(self) -> None:
        """Connect once, within the policy's connect timeout, then watch in the background."""
        self._closing = False
        try:
            await asyncio.wait_for(self._open(), self.policy.connect_timeout)
        except self._errors as exc:
            await self._discard_quietly()
            raise BrokerConnectionError(f"cannot connect to {self.name}: {_describe(exc)}") from exc
        self.ready.set()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        backoff = self.policy.backoff()
        while not self._closing:
            lost: BaseException | None = None
            try:
                await self._until_lost()
            except self._errors as exc:
                lost = exc
            except Exception as exc:  # a bug below: reconnecting is still the best way on
                logger.exception("watching the connection to %s failed", self.name)
                lost = exc
            if self._closing:
                return
            self.ready.clear()
            logger.warning("lost the connection to %s (%s); reconnecting", self.name,
                           _describe(lost) if lost is not None else "closed")
            if self._on_lost is not None:
                self._on_lost(lost)
            await self._discard_quietly()
            backoff.reset()
            while not self._closing:
                if backoff.exhausted:
                    logger.error("gave up reconnecting to %s after %d attempts", self.name,
                                 backoff.attempts)
                    self.gave_up = True
                    return
                delay = await backoff.sleep()
                try:
                    await asyncio.wait_for(self._open(), self.policy.connect_timeout)
                except Exception as exc:
                    if not isinstance(exc, self._errors):
                        logger.exception("reconnecting to %s failed", self.name)
                    logger.debug("reconnect to %s failed after %.2fs wait: %s", self.name, delay,
                                 _describe(exc))
                    await self._discard_quietly()
                    continue
                self.reconnects += 1
                logger.info("reconnected to %s after %d attempt(s)", self.name, backoff.attempts)
                self.ready.set()
                break

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return at once while connected; else wait (default: the connect timeout) for the
        reconnect, raising :class:`BrokerConnectionError` if it does not come in time."""
        if self.ready.is_set():
            return
        if self._closing or self._task is None:
            raise NotConnected(f"{self.name}: not connected")
        if self.gave_up:
            raise BrokerConnectionError(f"{self.name} is unreachable; gave up reconnecting")
        timeout = self.policy.connect_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise BrokerConnectionError(
                f"{self.name} is unreachable; still reconnecting after {timeout}s"
            ) from None

    async def close(self) -> None:
        """Stop watching (the caller then closes the connection itself)."""
        self._closing = True
        self.ready.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _discard_quietly(self) -> None:
        if self._discard is not None:
            with contextlib.suppress(Exception):
                await self._discard()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""Receiving: one PEEK_LOCK receiver per subscription, its settlements, lock renewal, deliveries.

A receive task reads batches from the subscription (``receive_messages``) and puts each message
into the subscription's :class:`Pump` (``put``: a busy handler stops the reading, the service
keeps the rest). Every message read is held in a :class:`LeaseKeeper` from the moment it was
read, so its lock is renewed while it waits in the buffer and while its handler runs.

Settlements wait for the service in azure-servicebus 7.15, one round trip each: completions go
through an :class:`AckBatcher` whose send runs a turn's completions concurrently
(``asyncio.gather``) in a task, so turns overlap too. A retry (``retry_later``) abandons the
message after the bus's delay (the lock is renewed meanwhile); the service redelivers it with
its delivery count one higher.
Closing a subscription abandons what it still holds, so another member gets it at once rather
than after the lock expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from amb_core.adapters.azure.rules import TOPIC_PROPERTY
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.errors import AmbError
from amb_core.runtime import AckBatcher, LeaseKeeper, Pump
from amb_core.topics import is_wildcard, matches

if TYPE_CHECKING:
    from amb_core.adapters.azure.broker import AzureServiceBusBroker

logger = logging.getLogger(__name__)

CONTENT_TYPE = "content-type"
Held = tuple[Any, Any]
"""(receiver, received message): a message is settled through the receiver that read it."""


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def message_body(message: Any) -> bytes:
    """The body of a received message as bytes: a data body is a sequence of byte sections;
    a value body (a foreign AMQP producer's) is encoded as text."""
    body = message.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    try:
        return b"".join(body)
    except TypeError:
        return str(body).encode()


def message_headers(message: Any) -> tuple[str | None, dict[str, str]]:
    """(amb topic, headers) of a received message. azure-servicebus 7.15 hands application
    property keys and string values over as bytes: both are decoded here."""
    headers: dict[str, str] = {}
    properties = message.application_properties
    if properties:
        for key, value in properties.items():
            headers[key.decode() if type(key) is bytes else str(key)] = _text(value)
    topic = headers.pop(TOPIC_PROPERTY, None)
    content_type = message.content_type
    if content_type and CONTENT_TYPE not in headers:
        headers[CONTENT_TYPE] = content_type
    return topic, headers


class ServiceBusDelivery(Delivery):
    __slots__ = ("_held", "_sub")

    def __init__(self, topic: str, body: bytes, headers: dict[str, str],
                 delivery_count: int | None, sub: Subscription, held: Held) -> None:
        super().__init__(topic, body, headers, delivery_count=delivery_count)
        self._sub = sub
        self._held = held

    async def ack(self) -> None:
        self._sub.complete(self._held)

    async def retry_later(self, delay: float) -> bool:
        return self._sub.abandon_later(self._held, delay)


class Subscription(BrokerSubscription):
    """One Service Bus subscription read by one receiver (members of a consumer group each
    have their own receiver on the group's subscription: the service gives each message to
    one of them)."""

    def __init__(
        self,
        broker: AzureServiceBusBroker,
        pattern: str,
        handler: DeliveryHandler,
        name: str,
        *,
        group: str | None,
        prefetch: int,
        own: bool,
        counted: bool = True,
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.name = name
        self.group = group
        self.own = own
        """A plain subscriber's subscription: deleted when it closes."""
        self.counted = counted
        """The service's delivery count is the message's (not on a dead-letter keeper)."""
        self.batch = prefetch
        self._handler = handler
        self._wild = is_wildcard(pattern)
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._receiver: Any = None
        self._opened = asyncio.get_running_loop().create_future()
        self._later: set[asyncio.Task[None]] = set()
        self._last: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self.acks: AckBatcher[Held] = AckBatcher(self._complete_batch,
                                                 name=f"settlements of {self!r}")
        self.leases: LeaseKeeper[Held] = LeaseKeeper(
            self._renew, renew_after=broker.lock_duration / 3, name=repr(self))
        self.pump: Pump[Held] = Pump(self._deliver, max_items=prefetch, name=repr(self))

    def __repr__(self) -> str:
        group = f" group={self.group!r}" if self.group else ""
        return f"<Service Bus subscription {self.name!r} for {self.pattern!r}{group}>"

    # --- receiving ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the receiver and start reading; returns once the receiver is open (a message
        published after that reaches it)."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(self._opened)

    async def _open(self) -> Any:
        from azure.servicebus.exceptions import MessagingEntityNotFoundError

        broker = self.broker
        receiver = broker.receiver(self.name)
        with broker.errors.mapped(f"opening the receiver of {self.name!r}"):
            try:
                await receiver.__aenter__()
            except MessagingEntityNotFoundError as exc:
                raise AmbError(
                    f"Azure Service Bus: subscription {self.name!r} of topic "
                    f"{broker.topic_name!r} (for {self.pattern!r}) does not exist"
                    + ("; with manage=False create it as docs/azure.md says"
                       if not broker.manage else "")
                ) from exc
        return receiver

    async def _run(self) -> None:
        broker = self.broker
        backoff = broker.reconnect.backoff()
        first = True
        while not self._closed:
            try:
                if not first and broker.manage:
                    await broker.ensure_subscription(self.name, self.pattern, own=self.own)
                self._receiver = receiver = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if first:
                    self._opened.set_exception(exc)
                    return
                logger.debug("reopening %r failed: %r", self, exc)
                if backoff.exhausted:
                    logger.error("gave up reopening %r after %d attempts", self, backoff.attempts)
                    return
                await backoff.sleep()
                continue
            if first:
                first = False
                self._opened.set_result(None)
            elif backoff.attempts:
                logger.info("reopened %r after %d attempt(s)", self, backoff.attempts)
            backoff.reset()
            try:
                await self._read(receiver)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                logger.warning("receiving from %r failed (%s: %s); reopening", self,
                               type(exc).__name__, exc)
                self._receiver = None
                with contextlib.suppress(Exception):
                    await receiver.close()
                await backoff.sleep()

    async def _read(self, receiver: Any) -> None:
        pump, leases, batch = self.pump, self.leases, self.batch
        wait = self.broker.receive_wait
        while not self._closed:
            messages = await receiver.receive_messages(max_message_count=batch,
                                                       max_wait_time=wait)
            now = time.monotonic()
            for message in messages:
                held = (receiver, message)
                leases.hold(held, now)
                await pump.put(held)

    def _deliver(self, held: Held) -> Awaitable[None]:
        message = held[1]
        topic, headers = message_headers(message)
        if topic is None or (topic != self.pattern and not (self._wild and
                                                            matches(self.pattern, topic))):
            # Let through by a rule wider than the pattern (or the $Default rule while the
            # subscription was being made): not ours; settle it so it does not come back.
            self.complete(held)
            return _DONE
        count = message.delivery_count
        if count is not None and self.counted:
            count += 1  # the AMQP header counts earlier deliveries; this one is one more
        else:
            count = None
        return self._handler(ServiceBusDelivery(topic, message_body(message), headers, count,
                                                self, held))

    # --- settlement ---------------------------------------------------------------------------

    def complete(self, held: Held) -> None:
        if self.leases.release(held):
            self.acks.add(held)

    def _complete_batch(self, batch: list[Held]) -> None:
        """The :class:`AckBatcher`'s send: a turn's completions run concurrently, in a task of
        their own, so the next turn's do not wait for these round trips either."""
        task = asyncio.get_running_loop().create_task(self._complete_all(batch))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _complete_all(self, batch: list[Held]) -> None:
        results = await asyncio.gather(*(receiver.complete_message(message)
                                         for receiver, message in batch),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning("%d of %d completion(s) on %r failed (%r); the service redelivers "
                           "them", len(failed), len(batch), self, failed[0])

    def abandon_later(self, held: Held, delay: float) -> bool:
        """Abandon ``held`` after ``delay`` seconds, but never before a retry asked for
        earlier on this subscription (the bus's jitter would otherwise let a later message's
        retry overtake an earlier one's, and with it its dead letter)."""
        if self._closed or held not in self.leases:
            return False
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._abandon_after(held, loop.time() + delay, self._last))
        self._last = task
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return True

    async def _abandon_after(self, held: Held, at: float,
                             previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        wait = at - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.leases.release(held):
            await self._abandon([held])

    async def _abandon(self, held: list[Held]) -> None:
        results = await asyncio.gather(*(receiver.abandon_message(message)
                                         for receiver, message in held),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.debug("%d abandon(s) on %r failed (%r); their locks expire instead",
                         len(failed), self, failed[0])

    async def _renew(self, keys: list[Held]) -> None:
        results = await asyncio.gather(*(receiver.renew_message_lock(message)
                                         for receiver, message in keys),
                                       return_exceptions=True)
        failed = [(key, result) for key, result in zip(keys, results, strict=False)
                  if isinstance(result, BaseException)]
        for key, _ in failed:
            # The lock is gone (the service redelivers the message): stop holding it.
            self.leases.release(key)
        if failed:
            logger.warning("renewing %d of %d lock(s) on %r failed (%r); those messages come "
                           "back from the service", len(failed), len(keys), self, failed[0][1])

    # --- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Safe to call concurrently and again: every caller waits for the one closing."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        broker = self.broker
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for later in list(self._later):
            later.cancel()
        await self.acks.close(broker.reconnect.connect_timeout)
        if self._settling:  # completions still on their way: before the receiver closes
            await asyncio.wait(set(self._settling), timeout=broker.reconnect.connect_timeout)
        held = self.leases.release_all()
        await self.leases.close()
        await self.pump.close()
        receiver, self._receiver = self._receiver, None
        if held and not self.own:
            # Back to the subscription at once, for another member (not after the lock).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._abandon(held), broker.reconnect.connect_timeout)
        if receiver is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(receiver.close(), broker.reconnect.connect_timeout)
        broker.forget(self)
        if self.own:
            await broker.delete_subscription_quietly(self.name)


class _Done:
    """An awaitable that is already done (no coroutine per skipped message)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_DONE: Awaitable[None] = _Done()

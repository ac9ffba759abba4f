"""Receiving: one long-polling loop per subscription queue, its deliveries, their leases and
their acknowledgements.

Per subscription: a receive loop (ReceiveMessage, 10 at a time, long polling) feeding the
runtime's :class:`Pump` (``put``: backpressure, SQS keeps what we do not take); a
:class:`LeaseKeeper` extending the visibility of what was received and not yet settled
(ChangeMessageVisibilityBatch), up to SQS's cap of 12 hours since receipt; an
:class:`AckBatcher` deleting what was handled (DeleteMessageBatch, 10 per call).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from amb_core.adapters.sqs.naming import (
    ENCODING_ATTRIBUTE,
    OWN_ATTRIBUTES,
    TOPIC_ATTRIBUTE,
    exact_on_sns,
)
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.runtime import AckBatcher, LeaseKeeper, Pump
from amb_core.topics import is_wildcard, matches

if TYPE_CHECKING:
    from amb_core.adapters.sqs.broker import AWSSQSBroker

logger = logging.getLogger(__name__)

MAX_VISIBILITY = 43_200
"""SQS refuses a visibility timeout reaching past 12 hours since the message's receipt."""
SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp", "SequenceNumber"]


class SQSDelivery(Delivery):
    __slots__ = ("_sub", "message_id", "receipt", "received_at", "settled")

    def __init__(self, sub: Subscription, topic: str, body: bytes, headers: dict[str, str],
                 count: int | None, receipt: str, message_id: str, received_at: float) -> None:
        super().__init__(topic, body, headers, delivery_count=count)
        self._sub = sub
        self.receipt = receipt
        self.message_id = message_id
        self.received_at = received_at
        self.settled = False

    async def ack(self) -> None:
        if self.settled:
            return
        self.settled = True
        sub = self._sub
        sub.leases.release(self)  # not held any more past the 12 h cap: deleted all the same
        sub.acks.add(self)
        if sub.fifo and not sub.leases:
            sub.settled.set()

    async def retry_later(self, delay: float) -> bool:
        """Make the message visible again after ``delay`` (rounded up to whole seconds, SQS's
        unit): SQS redelivers it with its receive count one higher."""
        if self.settled:
            return True
        self.settled = True
        sub = self._sub
        sub.leases.release(self)
        elapsed = time.monotonic() - self.received_at
        timeout = max(0, min(math.ceil(delay), int(MAX_VISIBILITY - elapsed) - 1))
        try:
            await sub.broker.change_visibility(sub.url, [(self.receipt, timeout)])
        finally:
            if sub.fifo and not sub.leases:
                sub.settled.set()
        return True


class Subscription(BrokerSubscription):
    """One queue read for one subscription (``kind``: plain, group, keeper, inbox)."""

    def __init__(self, broker: AWSSQSBroker, pattern: str, handler: DeliveryHandler,
                 group: str | None, prefetch: int, kind: str, queue: str) -> None:
        self.broker = broker
        self.pattern = pattern
        self.handler = handler
        self.group = group
        self.kind = kind
        self.queue = queue
        self.url = ""
        self.subscription_arn: str | None = None
        self.fifo = broker.use_fifo and kind != "inbox"
        self.check = is_wildcard(pattern) and not exact_on_sns(pattern)
        self.counted = kind != "keeper"  # listing a keeper's letters counts receives
        name = f"SQS queue {queue}"
        self.pump: Pump[SQSDelivery] = Pump(handler, max_items=max(prefetch, 10), name=name)
        self.leases: LeaseKeeper[SQSDelivery] = LeaseKeeper(
            self._renew, renew_after=max(broker.visibility_timeout / 3, 0.5), name=name)
        self.acks: AckBatcher[SQSDelivery] = AckBatcher(self._delete, name=name, max_batch=10)
        self.settled = asyncio.Event()
        self.settled.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._capped: set[str] = set()

    def __repr__(self) -> str:
        return f"<SQS subscription {self.pattern!r} group={self.group!r} queue={self.queue}>"

    async def start(self) -> None:
        """Make sure the queue (and its SNS subscription) exist, then start receiving."""
        await self.broker.prepare(self)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._receive_loop())

    # --- receiving -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        broker = self.broker
        wait = broker.wait_time_seconds
        while not self._closed:
            await broker.ready()
            if self.fifo and not self.settled.is_set():
                await self.settled.wait()  # FIFO: a group's next messages wait for these
                await self.acks.flush()
            try:
                response = await broker.sqs.receive_message(
                    QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=wait,
                    MessageSystemAttributeNames=SYSTEM_ATTRIBUTES,
                    MessageAttributeNames=["All"],
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                await broker.receive_failed(self, exc)
                continue
            messages = response.get("Messages")
            if not messages:
                continue
            now = time.monotonic()
            for raw in messages:
                delivery = await self._delivery(raw, now)
                if delivery is None:
                    continue
                self.leases.hold(delivery, now)
                if self.fifo:
                    self.settled.clear()
                await self.pump.put(delivery)

    async def _delivery(self, raw: dict[str, Any], now: float) -> SQSDelivery | None:
        attributes = raw.get("MessageAttributes")
        headers: dict[str, str] = {}
        topic = self.pattern
        encoding = None
        if attributes:
            for name, value in attributes.items():
                text = value.get("StringValue")
                if text is None:
                    continue
                if name in OWN_ATTRIBUTES:
                    if name == TOPIC_ATTRIBUTE:
                        topic = text
                    elif name == ENCODING_ATTRIBUTE:
                        encoding = text
                else:
                    headers[name] = text
        receipt = raw["ReceiptHandle"]
        if self.check and not matches(self.pattern, topic):
            await self._drop(receipt)
            return None
        content: str = raw["Body"]
        if encoding == "base64":
            body = base64.b64decode(content)
        else:
            body = content.encode()
            if self.broker.payloads is not None and self.broker.payloads.is_pointer(content):
                body = await self.broker.payloads.load(content)
        system = raw.get("Attributes")
        count = int(system["ApproximateReceiveCount"]) if system and self.counted else None
        return SQSDelivery(self, topic, body, headers, count, receipt, raw["MessageId"], now)

    async def _drop(self, receipt: str) -> None:
        """A message SNS let through that the pattern does not match ('a.*.c' got 'a.b.d')."""
        await self.broker.delete_receipts(self.url, [receipt])

    # --- leases and acknowledgements -------------------------------------------------------

    async def _renew(self, deliveries: list[SQSDelivery]) -> None:
        timeout = self.broker.visibility_timeout
        now = time.monotonic()
        changes: list[tuple[str, int]] = []
        for delivery in deliveries:
            left = int(MAX_VISIBILITY - (now - delivery.received_at)) - 1
            if left < timeout:
                if left >= 1:
                    changes.append((delivery.receipt, left))
                if delivery.message_id not in self._capped:
                    self._capped.add(delivery.message_id)
                    logger.error(
                        "message %s on SQS queue %s has been in flight for %.0f s; SQS caps a "
                        "message's visibility at 12 hours since its receipt, so it becomes "
                        "visible again in %d s and will be redelivered while its handler may "
                        "still run", delivery.message_id, self.queue,
                        now - delivery.received_at, max(left, 0),
                    )
                self.leases.release(delivery)
                continue
            changes.append((delivery.receipt, timeout))
        if changes:
            await self.broker.change_visibility(self.url, changes)

    async def _delete(self, deliveries: list[SQSDelivery]) -> None:
        await self.broker.delete_receipts(self.url, [d.receipt for d in deliveries])

    # --- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop receiving; what was received and not acknowledged becomes visible again at
        once (so another member takes it now, not after the visibility timeout)."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pump.close()
        await self.acks.close()
        held = self.leases.release_all()
        await self.leases.close()
        self.broker.forget(self)
        with contextlib.suppress(Exception):
            if held and self.kind in ("group", "keeper"):
                await self.broker.change_visibility(self.url, [(d.receipt, 0) for d in held])
            await self.broker.remove(self)

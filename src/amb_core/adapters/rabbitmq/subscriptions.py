"""Consuming: one channel per subscription, its acknowledgements, and the deliveries it makes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from amb_core.adapters.rabbitmq import _fast
from amb_core.adapters.rabbitmq.naming import binding_key
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.runtime import AckBatcher, Pump

if TYPE_CHECKING:
    from aiormq import Channel
    from aiormq.abc import AbstractConnection, DeliveredMessage

    from amb_core.adapters.rabbitmq.broker import RabbitMQBroker

logger = logging.getLogger(__name__)

CONTENT_TYPE = "content-type"
DELIVERY_COUNT = "x-delivery-count"
SPECVERSION = "cloudEvents:specversion"


async def open_channel(connection: AbstractConnection, *, confirms: bool) -> Channel:
    return cast("Channel", await connection.channel(publisher_confirms=confirms))


class AckRun:
    """Which ``basic.ack`` frames acknowledge a turn's tags, RabbitMQ's way.

    A single ``basic.ack multiple`` when every tag of the turn lies in the contiguous run of
    acknowledged tags (the usual case: one subscription acks in order), else one frame per
    tag. The multiple ack names the turn's highest tag, so it never names a tag already
    acknowledged (RabbitMQ closes the channel on an unknown delivery tag) and never covers one
    the bus has not acknowledged, so a message held back (unsubscribing, dying) still returns
    to the queue.
    """

    __slots__ = ("_acked", "_done")

    def __init__(self) -> None:
        self._done: set[int] = set()
        self._acked = 0  # every tag up to this one is acknowledged

    def plan(self, tags: list[int]) -> int:
        """The tag to ack with ``multiple`` (covering exactly ``tags``), or 0: one per tag."""
        done = self._done
        done.update(tags)
        acked = self._acked
        while acked + 1 in done:
            acked += 1
            done.discard(acked)
        self._acked = acked
        top = max(tags)
        return top if top <= acked else 0


def ack_sender(channel: Channel, fast: bool) -> Callable[[list[int]], Awaitable[None] | None]:
    """The ``send`` of a channel's :class:`AckBatcher`: plan the frames, then write them with
    the fast writer or aiormq's public ``basic_ack``."""
    run = AckRun()
    write: Callable[[list[int], int], Awaitable[None] | None]
    if fast:
        write = _fast.FastAckWriter(channel).write
    else:
        def write(tags: list[int], top: int) -> Awaitable[None] | None:
            return _fast.public_ack(channel, tags, top)

    def send(tags: list[int]) -> Awaitable[None] | None:
        if channel.is_closed:
            logger.debug("dropped %d ack(s) of a closed channel; the broker redelivers",
                         len(tags))
            return None
        return write(tags, run.plan(tags))

    return send


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class AmqpDelivery(Delivery):
    __slots__ = ("_acks", "_tag")

    def __init__(
        self,
        topic: str,
        body: bytes,
        headers: dict[str, str],
        delivery_count: int | None,
        reply_to: str | None,
        acks: AckBatcher[int] | None,
        tag: int,
        position: str | None = None,
    ) -> None:
        super().__init__(topic, body, headers, delivery_count=delivery_count, reply_to=reply_to,
                         position=position)
        self._acks = acks
        self._tag = tag

    async def ack(self) -> None:
        acks = self._acks
        if acks is not None:
            self._acks = None
            acks.add(self._tag)


def to_delivery(message: DeliveredMessage, acks: AckBatcher[int] | None,
                counted: bool = True,
                foreign: Callable[[str, str], str] | None = None) -> AmqpDelivery:
    """An AMQP message as the bus takes it. ``counted``: the queue's delivery count is the
    message's (not on dead-letter keepers, where listing the letters counts too).
    ``foreign``: makes the reply address of a request without an amb envelope (a plain AMQP
    RPC client's), which stands for its reply queue and its correlation id."""
    properties = message.header.properties
    table = properties.headers
    headers: dict[str, str] = {}
    count: int | None = None
    if table:
        for key, value in table.items():
            headers[key] = value if type(value) is str else _header_text(value)
        raw_count = table.get(DELIVERY_COUNT)
        if raw_count is not None:
            del headers[DELIVERY_COUNT]
            if counted:
                with contextlib.suppress(TypeError, ValueError):
                    # x-delivery-count counts the earlier deliveries: this one is one more.
                    count = int(cast(Any, raw_count)) + 1
    if count is None and counted and message.redelivered:
        count = 2  # delivered before (a classic queue keeps no count): at least the second try
    content_type = properties.content_type
    if content_type and CONTENT_TYPE not in headers:
        headers[CONTENT_TYPE] = content_type
    reply_to = properties.reply_to
    if reply_to and foreign is not None and properties.correlation_id \
            and SPECVERSION not in headers:
        reply_to = foreign(reply_to, properties.correlation_id)
    return AmqpDelivery(
        message.routing_key or "",
        message.body,
        headers,
        count,
        reply_to or None,
        acks,
        message.delivery_tag or 0,
    )


class Subscription(BrokerSubscription):
    """One consumer on its own channel; a :class:`Pump` hands its messages over in order.

    aiormq runs the consumer callback as a task per message; the callback only offers the
    message to the pump's buffer (the prefetch bounds what the broker sends ahead, the buffer
    holds twice that, so nothing is dropped: stale messages of a lost channel plus a new
    channel's prefetch), and the pump's one task calls the handler, so a busy handler holds
    back only its own subscription.
    """

    def __init__(
        self,
        broker: RabbitMQBroker,
        pattern: str,
        handler: DeliveryHandler,
        group: str | None,
        prefetch: int,
    ) -> None:
        self.broker = broker
        self.pattern = pattern
        self.binding = binding_key(pattern)
        self.group = group
        self.prefetch = prefetch
        self.queue = broker.group_queue_name(group, pattern) if group is not None else ""
        self.keeper = False
        """True while the group consumes the keeper queue of a dead-letter topic."""
        self._handler = handler
        self._foreign = broker.foreign_reply_address  # bound once, not per message
        self._channel: Channel | None = None
        self._acks: AckBatcher[int] | None = None
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self.pump: Pump[DeliveredMessage] = Pump(
            self._deliver, max_items=2 * prefetch, name=repr(self),
            hint="more than twice the prefetch arrived; a bug below the bus",
        )

    def __repr__(self) -> str:
        group = f" group={self.group!r}" if self.group else ""
        return f"<RabbitMQ subscription {self.pattern!r}{group} queue={self.queue!r}>"

    async def start(self, connection: AbstractConnection) -> None:
        """Open a channel, declare and bind the queue, consume. Called again after a reconnect."""
        if self._closed:
            return
        broker = self.broker
        keeper = (await broker.kept_queue(connection, self.pattern)
                  if self.group is not None else None)
        channel = await open_channel(connection, confirms=False)
        try:
            await channel.basic_qos(prefetch_count=self.prefetch)
            if keeper is not None:
                queue = keeper  # the letters wait there; every group on the topic shares it
            elif self.group is not None:
                queue = self.broker.group_queue_name(self.group, self.pattern)
                await channel.queue_declare(queue, durable=True,
                                            arguments=broker.group_queue_arguments())
                await channel.queue_bind(queue, broker.exchange, routing_key=self.binding)
            else:
                declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
                queue = declared.queue or ""
                await channel.queue_bind(queue, broker.exchange, routing_key=self.binding)
            if self.group is not None:
                # Unacknowledged messages of a lost channel go back to the group's queue and
                # come again: do not also hand over the stale copies still buffered here.
                self.pump.clear()
            self.queue = queue
            self.keeper = keeper is not None
            acks: AckBatcher[int] = AckBatcher(ack_sender(channel, broker.fast_path_on),
                                               name=f"acks of {self!r}")
            self._channel = channel
            self._acks = acks
            await channel.basic_consume(queue, self._on_message)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        if self._closed:  # unsubscribed while this ran
            with contextlib.suppress(Exception):
                await channel.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        self.pump.offer(message)

    def _deliver(self, message: DeliveredMessage) -> Awaitable[None]:
        # A plain function returning the handler's coroutine: no extra frame per message.
        # A message of an earlier (lost) channel cannot be acknowledged on the new one.
        acks = self._acks if message.channel is self._channel else None
        return self._handler(to_delivery(message, acks, not self.keeper, self._foreign))

    async def close(self) -> None:
        """Safe to call concurrently and again: every caller waits for the one closing."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        timeout = self.broker.reconnect.connect_timeout
        channel, self._channel = self._channel, None
        acks, self._acks = self._acks, None
        if acks is not None and channel is not None and not channel.is_closed:
            # Acks before the channel closes: a frame after channel.close is a connection
            # error. A message acknowledged later goes back to the queue.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(acks.close(), timeout)
        if channel is not None and not channel.is_closed:
            # Closing the channel cancels the consumer; its unacknowledged messages go back to
            # the queue (a plain subscription's queue is deleted with its last consumer).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(channel.close(), timeout)
        await self.pump.close()
        self.broker._subscriptions.discard(self)

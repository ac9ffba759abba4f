"""RabbitMQBroker: amb-core over RabbitMQ (AMQP 0-9-1), on aiormq.

Mapping (docs/rabbitmq.md has the reasons and the figures):

- One durable topic exchange (``exchange``, default ``amb``); a topic is the routing key.
- Plain subscription: an exclusive, auto-delete, server-named queue bound with the pattern. ``*``
  is AMQP's ``*``; amb's ``>`` (one or more trailing segments) becomes ``*.#`` (AMQP's ``#`` alone
  also matches zero segments).
- Consumer group: a durable queue per (group, pattern), quorum by default (``queue_type``),
  shared by the members; manual acks after the handler; prefetch = the subscription's
  ``max_concurrency``. Quorum queues count deliveries (``x-delivery-count``), which becomes
  the message's ``attempt`` after a crash. Retries and dead letters are the bus's.
- Publisher confirms on by default (``confirms``), awaited per publish on one channel, so
  concurrent publishers overlap their confirms instead of waiting for each other.
- Request/response: direct reply-to (``amq.rabbitmq.reply-to``) on one channel per bus, futures
  keyed by correlation id; requests are mandatory publishes, so a topic nobody is bound to
  fails fast with :class:`NoResponders`.
- Headers: the CloudEvents AMQP binding (``cloudEvents:`` application properties); the content
  type travels as the AMQP ``content_type`` property.
- Reconnect: one supervisor task per broker reconnects with backoff and restores the channels,
  the exchange and every subscription (group queues are durable, so nothing acknowledged or
  published with confirms is lost).

aio-pika is not used on purpose: its per-message objects cost about 1.5-3x the CPU of aiormq
(the layer under it) doing the same work, and the client process is CPU-bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from amb_core.adapters._client import require
from amb_core.broker import (
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    mask_url,
)
from amb_core.errors import (
    AmbError,
    BrokerConnectionError,
    NoResponders,
    NotConnected,
    RequestTimeout,
)

if TYPE_CHECKING:
    from types import ModuleType

    from aiormq import Channel
    from aiormq.abc import AbstractConnection, DeliveredMessage

logger = logging.getLogger(__name__)

PREFIX = "cloudEvents:"
CONTENT_TYPE = "content-type"
DELIVERY_COUNT = "x-delivery-count"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
QUEUE_TYPES = ("quorum", "classic")
MAX_NAME_BYTES = 255
_OWN_QUERY_KEYS = ("exchange", "queue_type", "confirms", "queue_prefix")


def binding_key(pattern: str) -> str:
    """amb pattern -> AMQP topic binding key (``>`` is one or more segments, ``#`` zero or more)."""
    segments = pattern.split(".")
    if "#" in segments:
        raise ValueError(
            f"pattern {pattern!r}: a '#' segment would be an AMQP wildcard on RabbitMQ; "
            "use amb's '>' (one or more trailing segments)"
        )
    if segments[-1] == ">":
        segments[-1:] = ["*", "#"]
    return ".".join(segments)


def _header_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class _Acker:
    """Acknowledgements of one channel, sent once per event-loop turn, in order.

    The acks of a turn go out as one write: a single ``basic.ack multiple`` when every tag of
    the turn lies in the contiguous run of acknowledged tags (the usual case: one subscription
    acks in order), else one frame per tag. The multiple ack names the turn's highest tag, so
    it never names a tag already acknowledged (RabbitMQ closes the channel on an unknown
    delivery tag) and never covers one the bus has not acknowledged, so a message held back
    (unsubscribing, dying) still returns to the queue. One socket write per turn instead of one
    per message is most of what the consumer side costs.

    aiormq's write queue is small (10 frames) and concurrent publishers keep it full: a frame
    that must wait for room goes to a backlog that one task writes in order, and later frames
    queue behind it. Writing them directly could overtake it (``asyncio.Queue`` lets
    ``put_nowait`` take a slot freed for a waiting ``put``): a multiple ack overtaken by a
    later one names an unknown tag, and the broker closes the channel with its queue.
    """

    __slots__ = ("_acked", "_aiormq", "_backlog", "_channel", "_done", "_scheduled", "_stopped",
                 "_tags", "_writer")

    def __init__(self, channel: Channel, aiormq: ModuleType) -> None:
        self._channel = channel
        self._aiormq = aiormq
        self._tags: list[int] = []
        self._done: set[int] = set()
        self._acked = 0  # every tag up to this one is acknowledged
        self._scheduled = False
        self._backlog: deque[Any] = deque()  # frames waiting for room, in order
        self._writer: asyncio.Task[None] | None = None
        self._stopped = False

    def ack(self, tag: int) -> None:
        if self._stopped:
            return
        self._tags.append(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        tags, self._tags = self._tags, []
        if not tags:
            return
        channel = self._channel
        if channel.is_closed:
            logger.debug("dropped %d ack(s) of a closed channel; the broker redelivers", len(tags))
            return
        done = self._done
        done.update(tags)
        acked = self._acked
        while acked + 1 in done:
            acked += 1
            done.discard(acked)
        self._acked = acked
        ack = self._aiormq.spec.Basic.Ack
        top = max(tags)
        if top <= acked:
            frames = [ack(delivery_tag=top, multiple=True)]
        else:
            frames = [ack(delivery_tag=tag) for tag in tags]
        frame = self._aiormq.abc.ChannelFrame.marshall(channel_number=channel.number,
                                                       frames=frames)
        if not self._backlog:
            try:
                channel.write_queue.put_nowait(frame)
                return
            except asyncio.QueueFull:
                pass
        self._backlog.append(frame)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_backlog())

    async def _write_backlog(self) -> None:
        backlog = self._backlog
        channel = self._channel
        try:
            while backlog:
                if channel.is_closed:
                    logger.debug("dropped %d ack frame(s) of a closed channel", len(backlog))
                    backlog.clear()
                    return
                await channel.write_queue.put(backlog[0])
                backlog.popleft()
        finally:
            self._writer = None

    async def close(self) -> None:
        """Write what is pending, then take no more acks: called before the channel is closed,
        since a frame after ``channel.close`` on the channel is a connection error. A message
        acknowledged later stays unacknowledged and goes back to the queue."""
        if self._scheduled:
            self._flush()
        self._stopped = True
        writer = self._writer
        if writer is not None:
            await writer


class _AmqpDelivery(Delivery):
    __slots__ = ("_acker", "_tag")

    def __init__(
        self,
        topic: str,
        body: bytes,
        headers: dict[str, str],
        delivery_count: int | None,
        reply_to: str | None,
        acker: _Acker | None,
        tag: int,
    ) -> None:
        super().__init__(topic, body, headers, delivery_count=delivery_count, reply_to=reply_to)
        self._acker = acker
        self._tag = tag

    async def ack(self) -> None:
        acker = self._acker
        if acker is not None:
            self._acker = None
            acker.ack(self._tag)


def _to_delivery(message: DeliveredMessage, acker: _Acker | None) -> _AmqpDelivery:
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
            with contextlib.suppress(TypeError, ValueError):
                # x-delivery-count counts the earlier deliveries: this one is one more.
                count = int(cast(Any, raw_count)) + 1
    if count is None and message.redelivered:
        count = 2  # delivered before (a classic queue keeps no count): at least the second try
    content_type = properties.content_type
    if content_type and CONTENT_TYPE not in headers:
        headers[CONTENT_TYPE] = content_type
    reply_to = properties.reply_to
    if reply_to and properties.correlation_id:
        reply_to = f"{reply_to} {properties.correlation_id}"
    return _AmqpDelivery(
        message.routing_key or "",
        message.body,
        headers,
        count,
        reply_to or None,
        acker,
        message.delivery_tag or 0,
    )


class _Subscription(BrokerSubscription):
    """One consumer on its own channel, with a worker that hands messages over in order.

    aiormq runs the consumer callback as a task per message; the callback only appends to a
    buffer (bounded by the prefetch: the broker sends no more unacknowledged messages), and one
    worker per subscription calls the handler, so a busy handler holds back only its own
    subscription.
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
        self._handler = handler
        self._buffer: deque[tuple[DeliveredMessage, _Acker]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._channel: Channel | None = None
        self._acker: _Acker | None = None
        self._closed = False
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def __repr__(self) -> str:
        group = f" group={self.group!r}" if self.group else ""
        return f"<RabbitMQ subscription {self.pattern!r}{group} queue={self.queue!r}>"

    async def start(self, connection: AbstractConnection) -> None:
        """Open a channel, declare and bind the queue, consume. Called again after a reconnect."""
        if self._closed:
            return
        broker = self.broker
        channel = await _open_channel(connection, confirms=False)
        try:
            await channel.basic_qos(prefetch_count=self.prefetch)
            if self.group is not None:
                declared = await channel.queue_declare(
                    self.queue, durable=True, arguments=broker.group_queue_arguments()
                )
            else:
                declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = declared.queue or ""
            await channel.queue_bind(queue, broker.exchange, routing_key=self.binding)
            if self.group is not None:
                # Unacknowledged messages of a lost channel go back to the group's queue and
                # come again: do not also hand over the stale copies still buffered here.
                self._buffer.clear()
            self.queue = queue
            assert broker._aiormq is not None
            acker = _Acker(channel, broker._aiormq)
            await channel.basic_consume(queue, functools.partial(self._on_message, acker))
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        self._channel = channel
        self._acker = acker
        if self._closed:  # unsubscribed while this ran
            with contextlib.suppress(Exception):
                await channel.close()

    async def _on_message(self, acker: _Acker, message: DeliveredMessage) -> None:
        self._buffer.append((message, acker))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _run(self) -> None:
        buffer = self._buffer
        handler = self._handler
        loop = asyncio.get_running_loop()
        while True:
            if not buffer:
                self._waiter = loop.create_future()
                await self._waiter
                continue
            message, acker = buffer.popleft()
            try:
                await handler(_to_delivery(message, acker))
            except Exception:
                logger.exception("%r: delivery failed; the message stays unacknowledged", self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.broker._subscriptions.discard(self)
        channel, self._channel = self._channel, None
        acker, self._acker = self._acker, None
        if acker is not None and channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(acker.close(), self.broker.connect_timeout)
        if channel is not None and not channel.is_closed:
            # Closing the channel cancels the consumer; its unacknowledged messages go back to
            # the queue (a plain subscription's queue is deleted with its last consumer).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), self.broker.connect_timeout)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._buffer.clear()


class RabbitMQBroker(Broker):
    """RabbitMQ through one topic exchange.

    ``exchange``: the topic exchange (declared durable; an ``amq.*`` name is used as it is).
    ``queue_type``: ``"quorum"`` (default) or ``"classic"`` for consumer-group queues.
    ``confirms``: publisher confirms (default on: ``publish`` returns once the broker has the
    message). ``persistent``: delivery mode 2, so classic durable queues keep messages over a
    restart (quorum queues always do). ``plain_prefetch``: the least prefetch of a plain
    (non-group) subscription, whose queue is its own so prefetch only bounds memory; a group's
    prefetch is exactly its ``max_concurrency`` so members share the load.
    ``queue_prefix``: names of group queues (``amb:<group>:<pattern>``). ``delivery_limit``: on
    quorum queues, dead-letter a message after that many deliveries (crash loops) through the
    exchange to ``default_dead_letter_topic``. ``queue_expires``: seconds after which an unused
    group queue is deleted by the broker (None: never). ``connect_timeout``: bound of connect,
    and of how long publish/subscribe wait for a reconnect. ``reconnect_interval``: first wait
    between reconnect attempts, doubled up to ``max_reconnect_interval``.
    """

    capabilities = Capabilities(
        wildcards=True,
        consumer_groups=True,
        persistent=True,
        redelivers_unacked=True,
        replay=False,
        ordering=True,
        at_least_once=True,
        headers=True,
        native_request_reply=True,
        reconnect=True,
        max_payload=128 * 1024 * 1024,  # RabbitMQ 3.8-3.13 default max_message_size (4.x: 16 MiB)
    )
    header_prefix = PREFIX

    def __init__(
        self,
        url: str = "amqp://guest:guest@localhost:5672/",
        *,
        exchange: str = "amb",
        queue_type: str = "quorum",
        confirms: bool = True,
        persistent: bool = True,
        plain_prefetch: int = 256,
        queue_prefix: str = "amb:",
        delivery_limit: int | None = None,
        queue_expires: float | None = None,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 0.5,
        max_reconnect_interval: float = 5.0,
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        if not exchange:
            raise ValueError("exchange must be a non-empty name (the default exchange cannot "
                             "route topics)")
        if plain_prefetch < 1:
            raise ValueError("plain_prefetch must be at least 1")
        if delivery_limit is not None and (delivery_limit < 1 or queue_type != "quorum"):
            raise ValueError("delivery_limit must be >= 1 and needs queue_type='quorum'")
        self.url = url
        self.exchange = exchange
        self.queue_type = queue_type
        self.confirms = confirms
        self.persistent = persistent
        self.plain_prefetch = plain_prefetch
        self.queue_prefix = queue_prefix
        self.delivery_limit = delivery_limit
        self.queue_expires = queue_expires
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self.max_reconnect_interval = max_reconnect_interval
        self._aiormq: ModuleType | None = None
        self._properties: Any = None
        self._connection: AbstractConnection | None = None
        self._publish_channel: Channel | None = None
        self._reply_channel: Channel | None = None
        self._rpc_channel: Channel | None = None
        self._subscriptions: set[_Subscription] = set()
        self._pending: dict[str, asyncio.Future[Delivery]] = {}
        self._rpc_ids = itertools.count(1)
        self._ready: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._delivery_mode = 2 if persistent else 1

    def __repr__(self) -> str:
        return (
            f"RabbitMQBroker(url={mask_url(self.url)!r}, exchange={self.exchange!r}, "
            f"queue_type={self.queue_type!r}, confirms={self.confirms})"
        )

    @classmethod
    def from_url(cls, url: str) -> RabbitMQBroker:
        """``amqp[s]://user:password@host:port/vhost?exchange=amb&queue_type=classic&confirms=0``;
        other query parameters (``heartbeat``, ``name``, TLS files ...) go to the client."""
        parts = urlsplit(url)
        ours: dict[str, Any] = {}
        rest = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _OWN_QUERY_KEYS:
                ours[key] = value
            else:
                rest.append((key, value))
        if "confirms" in ours:
            ours["confirms"] = ours["confirms"].lower() not in ("0", "false", "no", "off")
        client_url = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(url=client_url, **ours)

    # --- naming ----------------------------------------------------------------------------

    def group_queue_name(self, group: str, pattern: str) -> str:
        """The durable queue of a consumer group on a pattern (at most 255 bytes)."""
        name = f"{self.queue_prefix}{group}:{pattern}"
        if len(name.encode()) <= MAX_NAME_BYTES:
            return name
        digest = hashlib.sha256(f"{group}\0{pattern}".encode()).hexdigest()[:24]
        head = f"{self.queue_prefix}{group}"[:150]
        while len(head.encode()) > 150:
            head = head[:-1]
        return f"{head}:{digest}"

    def group_queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        if self.delivery_limit is not None:
            arguments["x-delivery-limit"] = self.delivery_limit
            arguments["x-dead-letter-exchange"] = self.exchange
            arguments["x-dead-letter-routing-key"] = self.default_dead_letter_topic
        if self.queue_expires is not None:
            arguments["x-expires"] = max(int(self.queue_expires * 1000), 1)
        return arguments

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            return
        aiormq = self._aiormq = require("aiormq", "rabbitmq")
        self._properties = aiormq.spec.Basic.Properties
        self._closing = False
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        try:
            await asyncio.wait_for(self._open(), self.connect_timeout)
        except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
            raise BrokerConnectionError(
                f"cannot connect to RabbitMQ at {mask_url(self.url)}: {exc!r}"
            ) from exc
        self._ready.set()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _open(self) -> None:
        """One connection with its publish channels and the exchange; the previous one is gone."""
        assert self._aiormq is not None
        connection: AbstractConnection = await self._aiormq.connect(self.url)
        try:
            publish = await _open_channel(connection, confirms=self.confirms)
            if self.exchange.startswith("amq."):
                await publish.exchange_declare(self.exchange, exchange_type="topic", passive=True)
            else:
                await publish.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            reply = (await _open_channel(connection, confirms=False)
                     if self.confirms else publish)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection = connection
        self._publish_channel = publish
        self._reply_channel = reply
        self._rpc_channel = None

    async def _supervise(self) -> None:
        """Wait for the connection to drop; then reconnect with backoff and restore everything."""
        assert self._aiormq is not None and self._ready is not None and self._lock is not None
        errors = (OSError, asyncio.TimeoutError, self._aiormq.exceptions.AMQPError, RuntimeError)
        while not self._closing:
            connection = self._connection
            assert connection is not None
            with contextlib.suppress(Exception):
                await connection.closing
            if self._closing:
                return
            self._ready.clear()
            logger.warning("lost the connection to RabbitMQ at %s; reconnecting",
                           mask_url(self.url))
            self._fail_pending(BrokerConnectionError("the connection to RabbitMQ was lost"))
            delay = self.reconnect_interval
            while not self._closing:
                try:
                    async with self._lock:
                        await asyncio.wait_for(self._open(), self.connect_timeout)
                        assert self._connection is not None
                        for sub in list(self._subscriptions):
                            await asyncio.wait_for(sub.start(self._connection),
                                                   self.connect_timeout)
                    break
                except errors as exc:
                    logger.info("reconnect to %s failed (%r); next try in %.1fs",
                                mask_url(self.url), exc, delay)
                    if self._connection is not None:
                        with contextlib.suppress(Exception):
                            await self._connection.close()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_reconnect_interval)
            if not self._closing:
                logger.warning("reconnected to RabbitMQ at %s; %d subscription(s) restored",
                               mask_url(self.url), len(self._subscriptions))
                self._ready.set()

    async def _wait_ready(self) -> AbstractConnection:
        ready = self._ready
        if ready is None or self._closing:
            raise NotConnected("RabbitMQBroker is not connected")
        if not ready.is_set():
            try:
                await asyncio.wait_for(ready.wait(), self.connect_timeout)
            except asyncio.TimeoutError:
                raise BrokerConnectionError(
                    f"RabbitMQ at {mask_url(self.url)} is unreachable; still reconnecting after "
                    f"{self.connect_timeout}s"
                ) from None
        assert self._connection is not None
        return self._connection

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
        self._rpc_channel = None

    async def close(self) -> None:
        if self._closing or self._connection is None:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for sub in list(self._subscriptions):
            await sub.close()
        await self._flush()
        self._fail_pending(BrokerConnectionError("the broker was closed"))
        connection, self._connection = self._connection, None
        self._publish_channel = self._reply_channel = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.close(), self.connect_timeout)

    async def _flush(self) -> None:
        """Wait (bounded) until every publish so far reached the broker."""
        channel = self._publish_channel
        if channel is None or channel.is_closed:
            return
        with contextlib.suppress(Exception):
            if self.confirms:
                waiting = [f for f in channel.confirmations.values() if not f.done()]
                if waiting:
                    await asyncio.wait(waiting, timeout=self.connect_timeout)
            else:
                # Frames of one channel are sent and handled in order: when this round trip
                # ends, every publish written before it has reached the broker.
                await asyncio.wait_for(channel.basic_qos(prefetch_count=0), self.connect_timeout)

    # --- publish ---------------------------------------------------------------------------

    async def _channel(self, kind: str) -> Channel:
        """The publish/reply channel, reopened if the broker closed it (not the connection)."""
        connection = await self._wait_ready()
        assert self._lock is not None
        async with self._lock:
            channel = self._publish_channel if kind == "publish" else self._reply_channel
            if channel is None or channel.is_closed:
                confirms = self.confirms and kind == "publish"
                channel = await _open_channel(connection, confirms=confirms)
                if kind == "publish" or not self.confirms:
                    self._publish_channel = channel
                if kind == "reply" or not self.confirms:
                    self._reply_channel = channel
            return channel

    def _build(self, headers: dict[str, str], **extra: Any) -> Any:
        table = dict(headers)
        content_type = table.pop(CONTENT_TYPE, None)
        return self._properties(
            content_type=content_type, headers=table, message_id=headers.get(PREFIX + "id"),
            **extra,
        )

    @staticmethod
    def _check_key(topic: str) -> None:
        if len(topic) > 85 and len(topic.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"topic {topic[:40]!r}... is over AMQP's 255-byte routing key limit")

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        channel = self._publish_channel
        if channel is None or channel.is_closed or self._closing or not self._ready_now():
            channel = await self._channel("publish")
        self._check_key(topic)
        properties = self._build(headers, delivery_mode=self._delivery_mode)
        try:
            await channel.basic_publish(
                body, exchange=self.exchange, routing_key=topic, properties=properties,
                wait=False,
            )
        except Exception as exc:
            raise self._publish_error(exc) from exc

    def _ready_now(self) -> bool:
        ready = self._ready
        return ready is not None and ready.is_set()

    def _publish_error(self, exc: Exception) -> Exception:
        assert self._aiormq is not None
        exceptions = self._aiormq.exceptions
        if isinstance(exc, exceptions.DeliveryError):
            return AmbError(f"RabbitMQ refused the message (basic.nack): {exc!r}")
        if isinstance(exc, (exceptions.AMQPError, ConnectionError, RuntimeError,
                            asyncio.CancelledError)):
            return BrokerConnectionError(f"publish to RabbitMQ failed: {exc!r}")
        return exc

    async def send_reply(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish to ``reply_to`` on the default exchange (direct reply-to or a reply queue),
        with the request's correlation id (carried in the address) as the AMQP property."""
        address, _, correlation_id = reply_to.partition(" ")
        channel = self._reply_channel
        if channel is None or channel.is_closed or not self._ready_now():
            channel = await self._channel("reply")
        properties = self._build(headers, correlation_id=correlation_id or None, delivery_mode=1)
        try:
            await channel.basic_publish(
                body, exchange="", routing_key=address, properties=properties, wait=False
            )
        except Exception as exc:
            raise self._publish_error(exc) from exc

    # --- subscribe -------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        binding_key(pattern)  # ValueError before any I/O
        if group is None:
            prefetch = max(prefetch, self.plain_prefetch)
        sub = _Subscription(self, pattern, handler, group, prefetch)
        try:
            connection = await self._wait_ready()
            assert self._lock is not None
            async with self._lock:
                await asyncio.wait_for(sub.start(connection), self.connect_timeout)
                self._subscriptions.add(sub)
        except BaseException:
            await sub.close()
            raise
        return sub

    # --- request / reply -------------------------------------------------------------------

    async def _rpc(self) -> Channel:
        channel = self._rpc_channel
        if channel is not None and not channel.is_closed and self._ready_now():
            return channel
        connection = await self._wait_ready()
        assert self._lock is not None
        async with self._lock:
            channel = self._rpc_channel
            if channel is None or channel.is_closed:
                # Confirms on this channel make unroutable (mandatory) requests come back.
                channel = await _open_channel(connection, confirms=True)
                await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                self._rpc_channel = channel
            return channel

    async def _on_reply(self, message: DeliveredMessage) -> None:
        key = message.header.properties.correlation_id
        future = self._pending.pop(key, None) if key else None
        if future is None or future.done():
            logger.debug("dropped a reply (correlation id %r): its request is gone", key)
            return
        future.set_result(_to_delivery(message, None))

    async def request(
        self, topic: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Delivery:
        channel = await self._rpc()
        assert self._aiormq is not None
        self._check_key(topic)
        key = headers.get(PREFIX + "id") or f"amb-rpc-{next(self._rpc_ids)}"
        if key in self._pending:
            key = f"{key}.{next(self._rpc_ids)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()
        self._pending[key] = future
        timer = loop.call_later(timeout, _expire, future, topic, timeout)
        properties = self._build(
            headers, correlation_id=key, reply_to=DIRECT_REPLY_TO, delivery_mode=1,
            expiration=str(max(int(timeout * 1000), 1)),
        )
        try:
            try:
                returned = await channel.basic_publish(
                    body, exchange=self.exchange, routing_key=topic, properties=properties,
                    mandatory=True, timeout=timeout, wait=False,
                )
            except self._aiormq.exceptions.PublishError:
                raise NoResponders(
                    f"no queue is bound to {topic!r}: nobody serves the request"
                ) from None
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"no reply to {topic!r} within {timeout}s (the publish was not confirmed)"
                ) from None
            except Exception as exc:
                raise self._publish_error(exc) from exc
            if isinstance(returned, self._aiormq.abc.DeliveredMessage):  # on_return_raises off
                raise NoResponders(f"no queue is bound to {topic!r}: nobody serves the request")
            return await future
        finally:
            timer.cancel()
            self._pending.pop(key, None)


async def _open_channel(connection: AbstractConnection, *, confirms: bool) -> Channel:
    return cast("Channel", await connection.channel(publisher_confirms=confirms))


def _expire(future: asyncio.Future[Delivery], topic: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"no reply to {topic!r} within {timeout}s"))

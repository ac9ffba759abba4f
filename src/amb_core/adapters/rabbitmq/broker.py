"""RabbitMQBroker: amb-core over RabbitMQ (AMQP 0-9-1), on aiormq.

Mapping (docs/rabbitmq.md has the reasons and the figures):

- One durable topic exchange (``exchange``, default ``amb``); a topic is the routing key.
- Plain subscription: an exclusive, auto-delete, server-named queue bound with the pattern. ``*``
  is AMQP's ``*``; amb's ``>`` (one or more trailing segments) becomes ``*.#`` (AMQP's ``#`` alone
  also matches zero segments).
- Consumer group: a durable queue per (group, pattern), quorum by default (``queue_type``),
  shared by the members, named readably (:mod:`.naming`); manual acks after the handler;
  prefetch = the subscription's ``max_concurrency``. Quorum queues count deliveries
  (``x-delivery-count``), which becomes the message's ``attempt`` after a crash.
- Dead letters: ``keep_dead_letters(topic)`` declares a durable keeper queue bound to the topic;
  a consumer group on a kept topic consumes that keeper (every group on a dead-letter topic
  shares it), so it gets every letter kept, oldest first.
- Publisher confirms on by default (``confirms``), awaited per publish on one channel, so
  concurrent publishers overlap their confirms instead of waiting for each other.
- Request/response: direct reply-to (``amq.rabbitmq.reply-to``) on one channel opened on first
  use, replies matched by correlation id (the request's id); requests are mandatory publishes,
  so a topic nobody is bound to fails fast with :class:`NoResponders`.
- Headers: the CloudEvents AMQP binding (``cloudEvents:`` application properties); the content
  type travels as the AMQP ``content_type`` property.
- Reconnect: the runtime's :class:`Supervisor` reconnects with backoff; ``_open`` restores the
  channels, the exchange, the dead-letter keepers and every subscription.
- Several hosts (the nodes of a cluster: ``url=[...]`` or ``amqp://u:p@h1:5672,h2:5672/``):
  ``_open`` tries them in turn, starting after the one last lost, on connect and on every
  reconnect. Exchanges, bindings and quorum queues are the cluster's (a quorum queue keeps a
  copy on each of up to ``quorum_cluster_size`` nodes and survives the loss of a minority);
  a plain subscription's exclusive queue lives on the node the client is connected to and is
  declared again on the next node after a failover.

aio-pika is not used on purpose: its per-message objects cost about 1.5-3x the CPU of aiormq
(the layer under it) doing the same work, and the client process is CPU-bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from amb_core.adapters._client import require
from amb_core.adapters.rabbitmq import _fast
from amb_core.adapters.rabbitmq.naming import (
    MAX_NAME_BYTES,
    binding_key,
    check_prefix,
    group_queue_name,
    keeper_queue_name,
)
from amb_core.adapters.rabbitmq.subscriptions import Subscription, open_channel, to_delivery
from amb_core.broker import (
    INBOX_PREFIX,
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
from amb_core.runtime import ErrorMap, OnDemand, PendingReplies, ReconnectPolicy, Supervisor
from amb_core.topics import is_wildcard

if TYPE_CHECKING:
    from types import ModuleType

    from aiormq import Channel
    from aiormq.abc import AbstractConnection, DeliveredMessage

    from amb_core.runtime.errors import Mapping

logger = logging.getLogger(__name__)

PREFIX = "cloudEvents:"
ID = PREFIX + "id"
CAUSATION_ID = PREFIX + "causationid"
SPECVERSION = PREFIX + "specversion"
CONTENT_TYPE = "content-type"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
QUEUE_TYPES = ("quorum", "classic")
FOREIGN_REPLY = "amb.foreign-reply."
"""Reply addresses handed to the bus for requests of plain AMQP clients (see send_reply)."""
_FOREIGN_REPLIES_KEPT = 4096
_OWN_QUERY_KEYS = ("exchange", "queue_type", "confirms", "queue_prefix")


def _error_map() -> Mapping:
    from aiormq import exceptions as e

    return (
        (e.DeliveryError, AmbError),  # basic.nack: the broker refused the message
        ((e.ChannelAccessRefused, e.ChannelNotFoundEntity, e.ChannelPreconditionFailed,
          e.ChannelLockedResource), AmbError),  # refused declarations: not a lost connection
        ((e.AMQPError, ConnectionError, e.ChannelInvalidStateError), BrokerConnectionError),
    )


def split_hosts(url: str) -> list[str]:
    """``amqp://u:p@h1:5672,h2:5673/vh?q`` -> one URL per host (same credentials, vhost and
    query); a URL with one host comes back alone."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [url]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host.strip()}"))
            for host in hosts.split(",") if host.strip()]


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
    group or dead-letter queue is deleted by the broker (None: never). ``reconnect``: the
    runtime's :class:`ReconnectPolicy` (its ``connect_timeout`` also bounds how long calls wait
    for a reconnect). ``fast_path``: write acks with aiormq's internals where the installed
    aiormq is a tested version (:mod:`._fast`); False always uses the public API.

    ``url`` may name several hosts (a list of URLs, or one URL with a comma list of
    ``host:port``): connect and every reconnect try them in turn, each within
    ``connect_timeout`` divided by the number of hosts.
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
        url: str | list[str] = "amqp://guest:guest@localhost:5672/",
        *,
        exchange: str = "amb",
        queue_type: str = "quorum",
        confirms: bool = True,
        persistent: bool = True,
        plain_prefetch: int = 256,
        queue_prefix: str = "amb:",
        delivery_limit: int | None = None,
        queue_expires: float | None = None,
        reconnect: ReconnectPolicy | None = None,
        fast_path: bool = True,
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
        self.urls = split_hosts(url) if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("url must name at least one RabbitMQ host")
        self.url = self.urls[0]
        """The first host's URL (``urls`` has every host)."""
        self._next_host = 0
        """index in ``urls`` of the host the next connect tries first"""
        self.exchange = exchange
        self.queue_type = queue_type
        self.confirms = confirms
        self.persistent = persistent
        self.plain_prefetch = plain_prefetch
        self.queue_prefix = check_prefix(queue_prefix)
        self.delivery_limit = delivery_limit
        self.queue_expires = queue_expires
        self.reconnect = reconnect or ReconnectPolicy()
        self.fast_path = fast_path
        self.fast_path_on = False
        """Whether this connection writes acks through :mod:`._fast` (set at connect)."""
        self._aiormq: ModuleType | None = None
        self._properties: Any = None
        self._errors = ErrorMap("RabbitMQ", _error_map)
        self._connection: AbstractConnection | None = None
        self._publish_channel: Channel | None = None
        self._reply_channel: Channel | None = None
        self._rpc: OnDemand[Channel] = OnDemand(self._open_rpc)
        self._replies: PendingReplies[str, Delivery] = PendingReplies()
        self._foreign: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._subscriptions: set[Subscription] = set()
        self._kept: set[str] = set()
        self._ids = itertools.count(1)
        self._supervisor: Supervisor | None = None
        self._ready: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._delivery_mode = 2 if persistent else 1

    def _hosts_text(self) -> str:
        return ", ".join(mask_url(u) for u in self.urls)

    def __repr__(self) -> str:
        url = mask_url(self.url) if len(self.urls) == 1 else [mask_url(u) for u in self.urls]
        return (
            f"RabbitMQBroker(url={url!r}, exchange={self.exchange!r}, "
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
        return cls(url=split_hosts(client_url), **ours)

    # --- naming ----------------------------------------------------------------------------

    def group_queue_name(self, group: str, pattern: str) -> str:
        """The durable queue of a consumer group on a pattern (valid, unique, <= 255 bytes)."""
        return group_queue_name(self.queue_prefix, group, pattern)

    def keeper_queue_name(self, topic: str) -> str:
        """The durable queue keeping the letters of dead-letter topic ``topic``."""
        return keeper_queue_name(self.queue_prefix, topic)

    def group_queue_arguments(self) -> dict[str, Any]:
        arguments = self._queue_arguments()
        if self.delivery_limit is not None:
            arguments["x-delivery-limit"] = self.delivery_limit
            arguments["x-dead-letter-exchange"] = self.exchange
            arguments["x-dead-letter-routing-key"] = self.default_dead_letter_topic
        return arguments

    def _queue_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        if self.queue_expires is not None:
            arguments["x-expires"] = max(int(self.queue_expires * 1000), 1)
        return arguments

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        supervisor = self._supervisor
        if supervisor is not None and supervisor.running:
            return
        aiormq = self._aiormq = require("aiormq", "rabbitmq")
        self._properties = aiormq.spec.Basic.Properties
        self.fast_path_on = _fast.enabled(self.fast_path)
        self._lock = asyncio.Lock()
        self._close_task = None
        supervisor = self._supervisor = Supervisor(
            f"RabbitMQ at {self._hosts_text()}",
            open=self._open,
            until_lost=self._until_lost,
            discard=self._discard,
            on_lost=self._on_lost,
            policy=self.reconnect,
            errors=(OSError, aiormq.exceptions.AMQPError, RuntimeError),
        )
        self._ready = supervisor.ready
        await supervisor.start()

    async def _open(self) -> None:
        """One connection with its publish channels, the exchange, the dead-letter keepers and
        every subscription; the previous connection is gone."""
        assert self._aiormq is not None and self._lock is not None
        async with self._lock:
            connection = await self._connect_any()
            try:
                publish = await open_channel(connection, confirms=self.confirms)
                if self.exchange.startswith("amq."):
                    await publish.exchange_declare(self.exchange, exchange_type="topic",
                                                   passive=True)
                else:
                    await publish.exchange_declare(self.exchange, exchange_type="topic",
                                                   durable=True)
                reply = (await open_channel(connection, confirms=False)
                         if self.confirms else publish)
                self._connection = connection
                self._publish_channel = publish
                self._reply_channel = reply
                self._rpc.reset()
                for topic in sorted(self._kept):
                    await self._declare_keeper(connection, topic)
                for sub in list(self._subscriptions):
                    await sub.start(connection)
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
        if self._subscriptions:
            logger.debug("%d subscription(s) on %s restored", len(self._subscriptions),
                         mask_url(self.urls[self._next_host - 1]))

    async def _connect_any(self) -> AbstractConnection:
        """A connection to the first host that takes one, trying each in turn from the one
        after the host last connected to (so a lost node is tried last)."""
        assert self._aiormq is not None
        urls = self.urls
        if len(urls) == 1:
            return await self._aiormq.connect(urls[0])  # type: ignore[no-any-return]
        each = self.reconnect.connect_timeout / len(urls)
        failure: BaseException | None = None
        start = self._next_host
        for step in range(len(urls)):
            index = (start + step) % len(urls)
            try:
                connection: AbstractConnection = await asyncio.wait_for(
                    self._aiormq.connect(urls[index]), each)
            except (OSError, asyncio.TimeoutError, self._aiormq.exceptions.AMQPError) as exc:
                logger.debug("RabbitMQ at %s: %r; trying the next host", mask_url(urls[index]),
                             exc)
                failure = exc
                continue
            self._next_host = (index + 1) % len(urls)
            if step:
                logger.info("connected to RabbitMQ at %s (%d host(s) before it failed)",
                            mask_url(urls[index]), step)
            return connection
        assert failure is not None
        raise failure

    async def _until_lost(self) -> None:
        connection = self._connection
        assert connection is not None
        closing = connection.closing
        await asyncio.wait([closing])
        if closing.cancelled():
            return
        exc = closing.exception()
        if exc is not None:
            raise BrokerConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def _discard(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = self._reply_channel = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.reconnect.connect_timeout)

    def _on_lost(self, exc: BaseException | None) -> None:
        self._replies.fail_all(BrokerConnectionError("the connection to RabbitMQ was lost"))
        self._rpc.reset()

    async def _wait_ready(self) -> AbstractConnection:
        supervisor = self._supervisor
        if supervisor is None:
            raise NotConnected("RabbitMQBroker is not connected")
        await supervisor.wait_ready()
        connection = self._connection
        if connection is None:  # pragma: no cover - ready implies a connection
            raise BrokerConnectionError("RabbitMQ: no connection")
        return connection

    def _ready_now(self) -> bool:
        ready = self._ready
        return ready is not None and ready.is_set()

    async def close(self) -> None:
        """Stop the subscriptions, flush, disconnect. Concurrent and repeated calls all wait
        for the one closing."""
        task = self._close_task
        if task is None:
            if self._supervisor is None:
                return
            task = self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(task)

    async def _close(self) -> None:
        supervisor = self._supervisor
        assert supervisor is not None
        await supervisor.close()
        for sub in list(self._subscriptions):
            await sub.close()
        await self._flush()
        self._replies.fail_all(NotConnected("the broker was closed before the reply came"))
        self._rpc.reset()
        self._foreign.clear()
        await self._discard()

    async def _flush(self) -> None:
        """Wait (bounded) until every publish so far reached the broker."""
        channel = self._publish_channel
        if channel is None or channel.is_closed:
            return
        timeout = self.reconnect.connect_timeout
        with contextlib.suppress(Exception):
            if self.confirms and self.fast_path_on:
                waiting = _fast.unconfirmed(channel)
                if waiting:
                    await asyncio.wait(waiting, timeout=timeout)
            else:
                # Frames of one channel are sent and handled in order: when this round trip
                # ends, every publish written before it has reached the broker (with confirms
                # and no fast path, its confirm may still be on the way back).
                await asyncio.wait_for(channel.basic_qos(prefetch_count=0), timeout)

    @contextlib.asynccontextmanager
    async def _admin(self, connection: AbstractConnection | None = None,
                     ) -> AsyncIterator[Channel]:
        """A short-lived channel for declarations and listings (a refused one closes it, not
        the publish channel)."""
        if connection is None:
            connection = await self._wait_ready()
        channel = await open_channel(connection, confirms=False)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.reconnect.connect_timeout)

    # --- publish ---------------------------------------------------------------------------

    async def _channel(self, kind: str) -> Channel:
        """The publish/reply channel, reopened if the broker closed it (not the connection)."""
        connection = await self._wait_ready()
        assert self._lock is not None
        async with self._lock:
            channel = self._publish_channel if kind == "publish" else self._reply_channel
            if channel is None or channel.is_closed:
                confirms = self.confirms and kind == "publish"
                with self._errors.mapped(f"opening the {kind} channel"):
                    channel = await open_channel(connection, confirms=confirms)
                if kind == "publish" or not self.confirms:
                    self._publish_channel = channel
                if kind == "reply" or not self.confirms:
                    self._reply_channel = channel
            return channel

    def _build(self, headers: dict[str, str], **extra: Any) -> Any:
        table = dict(headers)  # a copy: the caller's headers stay as they are
        content_type = table.pop(CONTENT_TYPE, None)
        return self._properties(
            content_type=content_type, headers=table, message_id=headers.get(ID), **extra,
        )

    @staticmethod
    def _check_key(topic: str) -> None:
        if len(topic) > 85 and len(topic.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"topic {topic[:40]!r}... is over AMQP's 255-byte routing key limit")

    def _raise_mapped(self, exc: Exception, what: str) -> None:
        mapped = self._errors.translate(exc, what)
        if mapped is exc:
            raise exc
        raise mapped from exc

    @staticmethod
    def _lost_channel(channel: Channel, what: str) -> None:
        """A CancelledError out of a publish whose channel closed under it, in a task nobody
        cancels, is a lost channel (aiormq versions without ``_raise_on_channel_close`` cancel
        the pending confirmations): raise that. A real cancellation stays one. Python 3.10
        cannot tell the two apart (no ``Task.cancelling``): there it stays a cancellation."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        if cancelling is not None and channel.is_closed and not cancelling():
            raise BrokerConnectionError(f"RabbitMQ: {what} failed: the channel closed") from None

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        channel = self._publish_channel
        if channel is None or channel.is_closed or not self._ready_now():
            channel = await self._channel("publish")
        self._check_key(topic)
        properties = self._build(headers, delivery_mode=self._delivery_mode)
        try:
            await channel.basic_publish(
                body, exchange=self.exchange, routing_key=topic, properties=properties,
                wait=False,
            )
        except asyncio.CancelledError:
            self._lost_channel(channel, f"publish to {topic!r}")
            raise
        except Exception as exc:
            assert self._aiormq is not None
            if not isinstance(exc, self._aiormq.exceptions.DeliveryError) or \
                    isinstance(exc, self._aiormq.exceptions.PublishError):
                self._raise_mapped(exc, f"publish to {topic!r}")
            await self._publish_again(channel, topic, body, properties, exc)

    async def _publish_again(self, channel: Channel, topic: str, body: bytes,
                             properties: Any, nack: Exception) -> None:
        """The broker nacked a publish: send it once more on a new publish channel.

        RabbitMQ 3.10 (seen on a cluster, a quorum queue's leader node killed): a channel
        opened during the queue's leader election can nack every later publish to the queue
        while a new channel is served. A nack means the broker took no responsibility, so the
        message is sent again (a queue that took it anyway gets it twice: at least once)."""
        if self._publish_channel is channel:
            self._publish_channel = None
            if not self.confirms:  # pragma: no cover - nacks need confirms
                self._reply_channel = None
            # Later confirms of the old channel still come back: close it once they have.
            loop = asyncio.get_running_loop()
            loop.call_later(self.reconnect.connect_timeout,
                            lambda: loop.create_task(self._close_quietly(channel)))
        fresh = await self._channel("publish")
        try:
            await fresh.basic_publish(
                body, exchange=self.exchange, routing_key=topic, properties=properties,
                wait=False,
            )
        except asyncio.CancelledError:
            self._lost_channel(fresh, f"publish to {topic!r}")
            raise
        except Exception as exc:
            self._raise_mapped(exc, f"publish to {topic!r} (sent again after {nack})")

    async def _close_quietly(self, channel: Channel) -> None:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), self.reconnect.connect_timeout)

    async def send_reply(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish to ``reply_to`` (a direct reply-to or reply queue address, used as it is) on
        the default exchange. The AMQP correlation id is the request's id, which the reply's
        envelope carries as ``causationid``; a plain AMQP client's request was handed to the
        bus with an address of ours that stands for its queue and correlation id."""
        if reply_to.startswith(INBOX_PREFIX):  # the bus's own reply topic (streams, gather)
            await self.publish(reply_to, body, headers)
            return
        correlation_id = headers.get(CAUSATION_ID)
        if reply_to.startswith(FOREIGN_REPLY):
            foreign = self._foreign.pop(reply_to, None)
            if foreign is None:
                logger.debug("dropped a reply to %s: its request is too old", reply_to)
                return
            reply_to, correlation_id = foreign
        channel = self._reply_channel
        if channel is None or channel.is_closed or not self._ready_now():
            channel = await self._channel("reply")
        properties = self._build(headers, correlation_id=correlation_id, delivery_mode=1)
        try:
            await channel.basic_publish(
                body, exchange="", routing_key=reply_to, properties=properties, wait=False
            )
        except asyncio.CancelledError:
            self._lost_channel(channel, f"reply to {reply_to!r}")
            raise
        except Exception as exc:
            self._raise_mapped(exc, f"reply to {reply_to!r}")

    def foreign_reply_address(self, address: str, correlation_id: str) -> str:
        """An address standing for a plain AMQP client's reply queue and correlation id (its
        request carries no amb envelope, so the reply's ``causationid`` is not its id)."""
        token = f"{FOREIGN_REPLY}{next(self._ids)}"
        foreign = self._foreign
        foreign[token] = (address, correlation_id)
        if len(foreign) > _FOREIGN_REPLIES_KEPT:
            foreign.popitem(last=False)  # never answered: forget the oldest
        return token

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
        connection = await self._wait_ready()
        sub = Subscription(self, pattern, handler, group, prefetch)
        try:
            assert self._lock is not None
            async with self._lock:
                with self._errors.mapped(f"subscribe to {pattern!r}"):
                    await asyncio.wait_for(sub.start(connection), self.reconnect.connect_timeout)
                self._subscriptions.add(sub)
        except BaseException:
            await sub.close()
            raise
        return sub

    # --- dead letters and groups -----------------------------------------------------------

    async def _declare_keeper(self, connection: AbstractConnection, topic: str) -> str:
        """The keeper queue of ``topic``, bound to it. One that exists is used as it is (its
        type is whatever the first client to keep the topic declared), so brokers with other
        ``queue_type`` or ``queue_expires`` options can share a dead-letter topic."""
        assert self._aiormq is not None
        queue = self.keeper_queue_name(topic)
        async with self._admin(connection) as channel:
            try:
                await channel.queue_declare(queue, passive=True)
            except self._aiormq.exceptions.ChannelNotFoundEntity:
                pass  # the refusal closed this channel
            else:
                await channel.queue_bind(queue, self.exchange, routing_key=topic)
                return queue
        async with self._admin(connection) as channel:
            await channel.queue_declare(queue, durable=True, arguments=self._queue_arguments())
            await channel.queue_bind(queue, self.exchange, routing_key=topic)
        return queue

    async def keep_dead_letters(self, topic: str) -> None:
        """A durable keeper queue bound to ``topic`` (declared again after every reconnect):
        letters wait there from the first one, whether or not anyone subscribes."""
        connection = await self._wait_ready()
        with self._errors.mapped(f"keeping the dead letters of {topic!r}"):
            await self._declare_keeper(connection, topic)
        self._kept.add(topic)

    async def kept_queue(self, connection: AbstractConnection, pattern: str) -> str | None:
        """The keeper queue of dead-letter topic ``pattern`` if there is one (declared by any
        client), else None. A consumer group on a kept topic consumes the keeper."""
        if is_wildcard(pattern):
            return None
        queue = self.keeper_queue_name(pattern)
        if pattern in self._kept:
            return queue
        assert self._aiormq is not None
        async with self._admin(connection) as channel:
            try:
                await channel.queue_declare(queue, passive=True)
            except self._aiormq.exceptions.ChannelNotFoundEntity:
                return None
        return queue

    async def _get_all(self, channel: Channel, queue: str) -> AsyncIterator[DeliveredMessage]:
        assert self._aiormq is not None
        empty = self._aiormq.spec.Basic.GetEmpty
        while True:
            message = await channel.basic_get(queue, no_ack=False)
            if isinstance(message.delivery, empty):
                return
            yield message

    @staticmethod
    def _position(message: DeliveredMessage) -> str | None:
        properties = message.header.properties
        if properties.message_id:
            return str(properties.message_id)
        value = (properties.headers or {}).get(ID)
        return None if value is None else str(value)

    async def dead_letters(self, topic: str) -> AsyncIterator[Delivery]:
        """The letters in ``topic``'s keeper, oldest first, left in place: read with manual
        acks on a channel of their own, which is then closed, so RabbitMQ puts every one back
        where it was. ``position`` is the letter's message id."""
        queue = self.keeper_queue_name(topic)
        letters: list[Delivery] = []
        with self._errors.mapped(f"listing the dead letters of {topic!r}"):
            async with self._admin() as channel:
                assert self._aiormq is not None
                try:
                    await channel.queue_declare(queue, passive=True)
                except self._aiormq.exceptions.ChannelNotFoundEntity:
                    return  # nothing was ever kept there
                async for message in self._get_all(channel, queue):
                    delivery = to_delivery(message, None, counted=False)
                    delivery.position = self._position(message)
                    letters.append(delivery)
        for letter in letters:
            yield letter

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        """Acknowledge (remove) exactly the letters at ``positions`` (message ids; a duplicate
        listed twice is named twice); the others go back in their order."""
        wanted = Counter(str(position) for position in positions)
        removed = 0
        if not wanted:
            return 0
        queue = self.keeper_queue_name(topic)
        with self._errors.mapped(f"removing dead letters of {topic!r}"):
            async with self._admin() as channel:
                assert self._aiormq is not None
                try:
                    await channel.queue_declare(queue, passive=True)
                except self._aiormq.exceptions.ChannelNotFoundEntity:
                    return 0
                async for message in self._get_all(channel, queue):
                    position = self._position(message)
                    if position is not None and wanted[position] > 0:
                        await channel.basic_ack(message.delivery_tag or 0)
                        wanted[position] -= 1
                        removed += 1
                        if not +wanted:
                            break
        return removed

    async def delete_group(self, pattern: str, group: str) -> None:
        """Delete the group's durable queue with the messages waiting in it. A group on a kept
        dead-letter topic reads the keeper, which stays (the letters are not the group's)."""
        binding_key(pattern)
        queue = self.group_queue_name(group, pattern)
        with self._errors.mapped(f"deleting group {group!r} on {pattern!r}"):
            async with self._admin() as channel:
                await channel.queue_delete(queue)

    # --- request / reply -------------------------------------------------------------------

    async def _open_rpc(self) -> Channel:
        connection = await self._wait_ready()
        # Confirms on this channel make unroutable (mandatory) requests come back.
        channel = await open_channel(connection, confirms=True)
        await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
        return channel

    async def _rpc_channel(self) -> Channel:
        channel = self._rpc.value
        if channel is not None and not channel.is_closed and self._ready_now():
            return channel
        await self._wait_ready()
        if channel is not None and channel.is_closed and self._rpc.value is channel:
            self._rpc.reset()
        with self._errors.mapped("opening the request channel"):
            return await self._rpc.get()

    async def _on_reply(self, message: DeliveredMessage) -> None:
        key = message.header.properties.correlation_id
        if not key or key not in self._replies:
            logger.debug("dropped a reply (correlation id %r): its request is gone", key)
            return
        self._replies.resolve(key, to_delivery(message, None))

    async def request(
        self, topic: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Delivery:
        channel = await self._rpc_channel()
        assert self._aiormq is not None
        self._check_key(topic)
        key = headers.get(ID) or f"amb-rpc-{next(self._ids)}"
        if key in self._replies:  # the same message requested twice at once
            key = f"{key}.{next(self._ids)}"
        future = self._replies.expect(key, timeout, repr(topic))
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
            except asyncio.CancelledError:
                self._lost_channel(channel, f"request to {topic!r}")
                raise
            except Exception as exc:
                self._raise_mapped(exc, f"request to {topic!r}")
            if isinstance(returned, self._aiormq.abc.DeliveredMessage):  # on_return_raises off
                raise NoResponders(f"no queue is bound to {topic!r}: nobody serves the request")
            return await future
        finally:
            self._replies.discard(key)
            if not future.done():
                future.cancel()  # nobody waits for it any more; its deadline skips it

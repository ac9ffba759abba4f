"""AgentMessageBus: the API users write against, built once on top of any :class:`Broker`."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from amb_core import envelope
from amb_core.broker import Broker, BrokerSubscription, Delivery
from amb_core.errors import DecodeError, NotConnected, RequestTimeout, UnsupportedFeature
from amb_core.message import Message, new_id
from amb_core.observability._bus import observer_for
from amb_core.retry import (
    ATTEMPTS,
    ERROR_MESSAGE,
    ERROR_TYPE,
    MAX_ERROR_TEXT,
    ORIGINAL_TOPIC,
    RetryPolicy,
)
from amb_core.topics import is_wildcard, validate_pattern, validate_topic

if TYPE_CHECKING:
    from amb_core.observability._bus import BusObserver, Probe

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Any]] | Callable[[Message], Any]
_NOTHING_TO_ACK = Delivery.ack
"""Deliveries that keep the base class's ack (core NATS, Redis pub/sub) skip the await."""
INBOX_PREFIX = "_amb.inbox."


def _as_async(handler: Handler) -> Callable[[Message], Awaitable[Any]]:
    """Async handlers as they are; sync ones run in a worker thread, off the event loop."""
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}")
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__  # an object with an async __call__
    ):
        return handler

    @functools.wraps(handler)
    async def run_in_thread(msg: Message) -> Any:
        result = await asyncio.to_thread(handler, msg)
        if inspect.isawaitable(result):
            result = await result
        return result

    return run_in_thread


class Subscription:
    """A running subscription; ``await sub.unsubscribe()`` stops it (draining its handlers)."""

    def __init__(
        self,
        bus: AgentMessageBus,
        pattern: str,
        handler: Handler,
        *,
        group: str | None,
        retry: RetryPolicy,
        dead_letter_topic: str | None,
        max_concurrency: int,
    ) -> None:
        self.bus = bus
        self.pattern = pattern
        self.group = group
        self.handler = handler
        self.retry = retry
        self.dead_letter_topic = dead_letter_topic
        self.max_concurrency = max_concurrency
        self._call = _as_async(handler)
        self._broker_sub: BrokerSubscription | None = None
        self._closing = False
        self._busy = 0  # handlers running inline (max_concurrency == 1)
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # metrics/tracing of this subscription (amb_core.observability); None when off
        observer = bus._observer
        self._probe: Probe | None = observer.probe(self) if observer is not None else None

    def __repr__(self) -> str:
        group = f" group={self.group!r}" if self.group else ""
        return f"<Subscription {self.pattern!r}{group} concurrency={self.max_concurrency}>"

    @property
    def active(self) -> bool:
        return self._broker_sub is not None and not self._closing

    async def unsubscribe(self, timeout: float | None = None) -> None:
        """Stop receiving; wait (bounded by ``timeout``, default the bus's drain timeout) for
        running handlers. Other subscriptions, on the same topic too, are untouched."""
        await self.bus._stop_subscription(self, timeout)

    async def _deliver(self, delivery: Delivery) -> None:
        """Called by the adapter per message, in order; returns when the bus has taken it."""
        if self._closing:
            return  # not acknowledged: the broker keeps it where it keeps anything
        bus = self.bus
        msg = delivery.message
        if msg is None:
            try:
                msg = bus._decode(delivery)
            except DecodeError as exc:
                await bus._dead_letter_malformed(self, delivery, exc)
                return
            count = delivery.delivery_count
            if count is not None and count > msg.attempt:
                msg.attempt = count
        if self.max_concurrency == 1:
            self._busy += 1
            try:
                probe = self._probe
                if probe is not None and probe.tracing is not None:
                    await probe.process(msg, delivery)
                    return
                # bus._process inlined, metrics counted in place (sampled timing): no extra
                # call or coroutine frame per message on the hot path.
                timed = False
                if probe is not None:
                    probe.stats.delivered += 1
                    if probe.skip:
                        probe.skip -= 1
                    else:
                        probe.start_timing(msg)
                        timed = True
                try:
                    result = await self._call(msg)
                except Exception as exc:
                    if probe is not None:
                        if timed:
                            probe.stop_timing()
                        probe.stats.failed += 1
                    await bus._recover(self, msg, delivery, exc)
                else:
                    if probe is not None:
                        if timed:
                            probe.stop_timing()
                        probe.stats.succeeded += 1
                    if result is not None and msg.reply_to is not None:
                        await bus._send_reply(msg, result)
                    if not bus._local and type(delivery).ack is not _NOTHING_TO_ACK:
                        await bus._ack(delivery)
            finally:
                self._busy -= 1
                if self._closing and not self._busy:
                    self._idle.set()
            return
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._process_in_task(msg, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process_in_task(self, msg: Message, delivery: Delivery) -> None:
        try:
            if self._probe is not None:
                await self._probe.process(msg, delivery)
            else:
                await self.bus._process(self, msg, delivery)
        finally:
            self._slots.release()

    async def _drain(self, timeout: float) -> None:
        self._closing = True
        if self._busy:
            self._idle.clear()
        waiters: list[Awaitable[Any]] = list(self._tasks)
        if self._busy:
            waiters.append(self._idle.wait())
        if not waiters:
            return
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(w) for w in waiters], timeout=timeout
        )
        for future in pending:
            future.cancel()
        if pending:
            logger.warning(
                "%r: %d handler(s) still running after %.1fs; cancelled, not acknowledged",
                self, len(pending), timeout,
            )


class AgentMessageBus:
    """Publish, subscribe, request and replay over one broker.

    >>> bus = AgentMessageBus()                      # in-memory broker
    >>> bus = AgentMessageBus.from_url("redis://localhost:6379/0")
    """

    def __init__(
        self,
        broker: Broker | None = None,
        *,
        retry: RetryPolicy | None = None,
        request_timeout: float = 30.0,
        drain_timeout: float = 10.0,
        observer: bool | None = None,
    ) -> None:
        """``observer``: built-in metrics and tracing (:mod:`amb_core.observability`). None: on
        when the ``observability`` extra is installed; False: off, at no cost."""
        if broker is None:
            from amb_core.adapters.memory import MemoryBroker

            broker = MemoryBroker()
        self.broker = broker
        self.default_retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.drain_timeout = drain_timeout
        self.id = new_id()
        self._connected = False
        self._local = broker.in_process
        self._headers = broker.capabilities.headers
        self._prefix = broker.header_prefix
        self._max_payload = broker.capabilities.max_payload
        self._checked_topics: set[str] = set()
        self._subscriptions: set[Subscription] = set()
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._inbox: str | None = None
        self._inbox_lock = asyncio.Lock()
        self._observer: BusObserver | None = observer_for(self, observer)

    @classmethod
    def from_url(cls, url: str, **bus_options: Any) -> AgentMessageBus:
        """Pick the adapter from the URL's scheme (``memory://``, ``redis://``, ``nats://`` ...)."""
        from amb_core.adapters import broker_from_url

        return cls(broker=broker_from_url(url), **bus_options)

    @classmethod
    def from_env(cls, **bus_options: Any) -> AgentMessageBus:
        """The broker the environment names: ``AMB_URL``; else the one of ``REDIS_URL``,
        ``NATS_URL``, ``RABBITMQ_URL``/``AMQP_URL``, ``KAFKA_SERVERS`` that is set (several:
        ValueError); else ``memory://``, with a warning. See :mod:`amb_core.config`."""
        from amb_core.config import url_from_env

        return cls.from_url(url_from_env(warn=True), **bus_options)

    def __repr__(self) -> str:
        state = "connected" if self._connected else "not connected"
        return f"<AgentMessageBus {self.broker!r} {state}>"

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        """Connect the broker. A refused connection raises a subclass of ``ConnectionError``."""
        if self._connected:
            return
        await self.broker.connect()
        self._connected = True
        from amb_core.broker import mask_url  # reprs mask already; this guards a new adapter's

        logger.info("connected to %s", mask_url(repr(self.broker)))
        if self._observer is not None:
            self._observer.refresh()  # picks up a tracer provider set since the bus was made

    async def close(self, timeout: float | None = None) -> None:
        """Stop all subscriptions, wait up to ``timeout`` (default ``drain_timeout``) for running
        handlers, fail pending requests, then flush and disconnect the broker."""
        if not self._connected:
            return
        timeout = self.drain_timeout if timeout is None else timeout
        await asyncio.gather(
            *(self._stop_subscription(sub, timeout) for sub in list(self._subscriptions))
        )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("the bus was closed before the reply came"))
        self._pending.clear()
        self._inbox = None
        self._connected = False
        await self.broker.close()

    async def __aenter__(self) -> AgentMessageBus:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_connected(self) -> None:
        if not self._connected:
            raise NotConnected("call `await bus.connect()` (or use `async with`) first")

    # --- publish -----------------------------------------------------------------------------

    async def publish(self, msg: Message) -> None:
        """Send ``msg`` to its topic. Invalid topics raise ValueError here, at the call."""
        if not self._connected:
            self._require_connected()
        topic = msg.topic
        if topic not in self._checked_topics:
            self._check_topic(topic)
        obs = self._observer
        span = obs.publishing(msg) if obs is not None and obs.tracing is not None else None
        try:
            if self._local:
                blocked = self.broker.publish_local(msg)
                if blocked is not None:
                    await blocked
            else:
                body, headers = self._encode(msg)
                if self._max_payload is not None and len(body) > self._max_payload:
                    raise ValueError(
                        f"message body of {len(body)} bytes is over "
                        f"{type(self.broker).__name__}'s limit of {self._max_payload} bytes"
                    )
                await self.broker.publish(topic, body, headers)
        except BaseException as exc:
            if obs is not None and span is not None:
                obs.failed(span, exc)
            raise
        if obs is not None:
            stats = obs.topic_stats.get(topic) if span is None else None
            if stats is not None:
                stats.published += 1  # BusObserver.published's common case, inlined
            else:
                obs.published(msg, span)

    def _check_topic(self, topic: str) -> None:
        """ValueError for an invalid topic; valid ones are remembered (hot path)."""
        validate_topic(topic)
        if len(self._checked_topics) > 10_000:
            self._checked_topics.clear()
        self._checked_topics.add(topic)

    def _encode(self, msg: Message) -> tuple[bytes, dict[str, str]]:
        if self._headers:
            return envelope.encode_binary(msg, prefix=self._prefix)
        return envelope.encode_structured(msg), {}

    def _decode(self, delivery: Delivery) -> Message:
        if self._headers:
            msg = envelope.decode_binary(
                delivery.body, delivery.headers, topic=delivery.topic, prefix=self._prefix
            )
        else:
            msg = envelope.decode_structured(delivery.body, topic=delivery.topic)
        if delivery.reply_to is not None:
            msg.reply_to = delivery.reply_to
        if delivery.position is not None:
            msg.position = delivery.position
        return msg

    # --- subscribe ---------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        consumer_group: str | None = None,
        retry: RetryPolicy | None = None,
        dead_letter_topic: str | None = None,
        max_concurrency: int = 1,
    ) -> Subscription:
        """Call ``handler(msg)`` for every message whose topic matches ``pattern``.

        ``*`` matches one segment, ``>`` one or more trailing segments. With ``consumer_group``
        each message goes to exactly one subscriber of that group. A handler that raises is
        retried per ``retry`` (default: the bus's) and then dead-lettered to
        ``dead_letter_topic`` (default: the broker's). ``max_concurrency`` bounds the handlers
        running at once for this subscription; 1 (the default) keeps the broker's order.
        A sync handler runs in a worker thread. A handler's non-None return value is sent as the
        reply when the message has ``reply_to``.
        """
        self._require_connected()
        validate_pattern(pattern)
        caps = self.broker.capabilities
        if not caps.wildcards and is_wildcard(pattern):
            raise UnsupportedFeature(f"{type(self.broker).__name__} has no wildcard subscriptions")
        if consumer_group is not None:
            if not caps.consumer_groups:
                raise UnsupportedFeature(f"{type(self.broker).__name__} has no consumer groups")
            validate_topic(consumer_group)
        if dead_letter_topic is not None:
            validate_topic(dead_letter_topic)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        sub = Subscription(
            self,
            pattern,
            handler,
            group=consumer_group,
            retry=retry or self.default_retry,
            dead_letter_topic=dead_letter_topic,
            max_concurrency=max_concurrency,
        )
        sub._broker_sub = await self.broker.subscribe(
            pattern, sub._deliver, group=consumer_group, prefetch=max_concurrency
        )
        self._subscriptions.add(sub)
        logger.info("subscribed to %r %s", pattern, "(no consumer group)" if consumer_group is None
                    else f"in consumer group {consumer_group!r}")
        return sub

    async def delete_consumer_group(self, pattern: str, group: str) -> None:
        """Remove a consumer group's durable state on the broker (its stream group, durable
        consumer or queue). Raises UnsupportedFeature where the broker keeps none or cannot."""
        self._require_connected()
        validate_pattern(pattern)
        validate_topic(group)
        await self.broker.delete_group(pattern, group)

    async def _stop_subscription(self, sub: Subscription, timeout: float | None) -> None:
        if sub not in self._subscriptions:
            return
        self._subscriptions.discard(sub)
        await sub._drain(self.drain_timeout if timeout is None else timeout)
        if sub._broker_sub is not None:
            await sub._broker_sub.close()

    # --- processing: retries, dead letters, replies -------------------------------------------

    async def _process(self, sub: Subscription, msg: Message, delivery: Delivery) -> None:
        try:
            result = await sub._call(msg)
        except Exception as exc:
            await self._recover(sub, msg, delivery, exc)
        else:
            await self._succeeded(msg, delivery, result)

    async def _succeeded(self, msg: Message, delivery: Delivery, result: Any) -> None:
        if result is not None and msg.reply_to is not None:
            await self._send_reply(msg, result)
        if not self._local and type(delivery).ack is not _NOTHING_TO_ACK:
            await self._ack(delivery)

    async def _recover(
        self, sub: Subscription, msg: Message, delivery: Delivery, exc: Exception
    ) -> None:
        """After a failed attempt: retry per the policy, then dead-letter after the last."""
        policy = sub.retry
        probe = sub._probe
        while msg.attempt < policy.max_attempts:
            delay = policy.delay_before(msg.attempt + 1)
            logger.info(
                "handler %r failed on %s (attempt %d of %d, retry in %.2fs): %r",
                sub.handler, msg.id, msg.attempt, policy.max_attempts, delay, exc,
            )
            if probe is not None:
                probe.retrying(msg, delay)
            if await self._retry_later(delivery, delay):
                return  # the broker redelivers it later, with its delivery count
            await asyncio.sleep(delay)
            msg.attempt += 1
            try:
                result = await (sub._call(msg) if probe is None else probe.call(msg))
            except Exception as again:
                exc = again
                continue
            await self._succeeded(msg, delivery, result)
            return
        await self._dead_letter(sub, msg, delivery, exc)

    async def _retry_later(self, delivery: Delivery, delay: float) -> bool:
        try:
            return await delivery.retry_later(delay)
        except Exception:
            logger.warning("broker refused delayed redelivery; retrying in process", exc_info=True)
            return False

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception:
            logger.warning(
                "ack of a message on %s failed; the broker may redeliver it", delivery.topic,
                exc_info=True,
            )

    def _dead_letter_destination(self, sub: Subscription) -> str:
        return sub.dead_letter_topic or self.broker.default_dead_letter_topic

    async def _dead_letter(
        self, sub: Subscription, msg: Message, delivery: Delivery, exc: BaseException
    ) -> None:
        destination = self._dead_letter_destination(sub)
        headers = dict(msg.headers)
        headers[ERROR_TYPE] = type(exc).__qualname__
        headers[ERROR_MESSAGE] = str(exc)[:MAX_ERROR_TEXT]
        headers[ATTEMPTS] = str(msg.attempt)
        headers[ORIGINAL_TOPIC] = headers.get(ORIGINAL_TOPIC, msg.topic)
        if destination == msg.topic:
            # A failing dead-letter consumer must not feed its own queue forever.
            logger.error(
                "handler %r failed on dead letter %s from dead-letter topic %s after %d "
                "attempts; not re-queued into the same topic: %r",
                sub.handler, msg.id, destination, msg.attempt, exc,
            )
            await self._ack(delivery)
            return
        logger.warning(
            "dead-lettering %s from %s to %s after %d attempt(s): %r",
            msg.id, msg.topic, destination, msg.attempt, exc,
        )
        # A fresh delivery on the dead-letter topic: its consumers get their own attempts.
        dead = msg.copy(topic=destination, headers=headers, reply_to=None, position=None,
                        attempt=1)
        try:
            await self.publish(dead)
        except Exception:
            logger.error(
                "could not dead-letter %s to %s; left unacknowledged for redelivery",
                msg.id, destination, exc_info=True,
            )
            return
        if sub._probe is not None:
            sub._probe.dead_lettered(msg, destination)
        if not self._local:
            await self._ack(delivery)

    async def _dead_letter_malformed(
        self, sub: Subscription, delivery: Delivery, exc: DecodeError
    ) -> None:
        """A message that claims to be an envelope but is broken: dead-letter its raw bytes."""
        headers = {k: v for k, v in delivery.headers.items() if not k.startswith(self._prefix)}
        headers.update({
            ERROR_TYPE: type(exc).__qualname__,
            ERROR_MESSAGE: str(exc)[:MAX_ERROR_TEXT],
            ATTEMPTS: "0",
            ORIGINAL_TOPIC: delivery.topic,
        })
        raw = Message(topic=delivery.topic, payload=bytes(delivery.body), headers=headers)
        await self._dead_letter(sub, raw, delivery, exc)

    def _reply_message(self, request: Message, result: Any) -> Message:
        if isinstance(result, Message):
            reply = result.copy()
        else:
            reply = Message(topic=request.reply_to or "", payload=result)
        reply.topic = request.reply_to or reply.topic
        reply.correlation_id = request.correlation_id or request.id
        reply.causation_id = request.id
        reply.reply_to = None
        return reply

    async def _send_reply(self, request: Message, result: Any) -> None:
        reply = self._reply_message(request, result)
        obs = self._observer
        span = obs.publishing(reply, True) if obs is not None and obs.tracing is not None else None
        try:
            if self._local:
                blocked = self.broker.publish_local(reply)
                if blocked is not None:
                    await blocked
            else:
                body, headers = self._encode(reply)
                await self.broker.send_reply(reply.topic, body, headers)
        except Exception as exc:
            if obs is not None and span is not None:
                obs.failed(span, exc)
            logger.error("could not send the reply to %s", request.id, exc_info=True)
        else:
            if obs is not None:
                obs.published(reply, span, True)

    async def reply(
        self, request: Message, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        """Send ``payload`` as the reply to ``request`` (which must carry ``reply_to``)."""
        self._require_connected()
        if request.reply_to is None:
            raise ValueError(f"message {request.id} has no reply_to; nobody waits for a reply")
        await self._send_reply(request, Message(topic=request.reply_to, payload=payload,
                                                headers=dict(headers or {})))

    # --- request / reply ---------------------------------------------------------------------

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Publish ``msg`` and wait for its reply. Raises :class:`RequestTimeout`
        (a ``TimeoutError``) when none comes within ``timeout`` seconds."""
        self._require_connected()
        if msg.topic not in self._checked_topics:
            self._check_topic(msg.topic)
        timeout = self.request_timeout if timeout is None else timeout
        request = msg.copy(correlation_id=msg.correlation_id or msg.id)
        if self._observer is not None:  # round-trip metrics and a CLIENT span around it all
            return await self._observer.request(request, timeout, self._request)
        return await self._request(request, timeout)

    async def _request(self, request: Message, timeout: float) -> Message:
        if self.broker.capabilities.native_request_reply:
            body, headers = self._encode(request)
            delivery = await self.broker.request(request.topic, body, headers, timeout)
            return self._decode(delivery)
        inbox = self._inbox or await self._open_inbox()
        request.reply_to = inbox
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self._pending[request.id] = future
        expiry = loop.call_later(timeout, _expire, future, request, timeout)
        try:
            await self.publish(request)
            return await future
        finally:
            expiry.cancel()
            self._pending.pop(request.id, None)

    async def _open_inbox(self) -> str:
        async with self._inbox_lock:
            if self._inbox is None:
                inbox = INBOX_PREFIX + self.id
                await self.broker.subscribe(inbox, self._on_reply, prefetch=256)
                self._inbox = inbox
            return self._inbox

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            reply = delivery.message or self._decode(delivery)
        except DecodeError:
            logger.warning("dropped a malformed reply on %s", delivery.topic)
            return
        future = self._pending.get(reply.causation_id or "")
        if future is None or future.done():
            logger.debug("dropped a reply to %s: its request is gone (timed out?)",
                          reply.causation_id)
        else:
            future.set_result(reply)
        if not self._local:
            await self._ack(delivery)

    # --- replay ------------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | float | datetime | None = None
    ) -> AsyncIterator[Message]:
        """The messages the broker kept for ``topic`` (a pattern works too), oldest first.

        ``since``: None from the start; an ``int`` or ``str`` position (a message's ``position``,
        inclusive); a ``datetime`` or ``float`` (Unix seconds) a time. Ends at the newest kept
        message. Raises :class:`UnsupportedFeature` on brokers that keep no log.
        """
        self._require_connected()
        validate_pattern(topic)
        if not self.broker.capabilities.replay:
            raise UnsupportedFeature(f"{type(self.broker).__name__} keeps no log to replay")
        if isinstance(since, float):
            since = datetime.fromtimestamp(since, timezone.utc)
        async for delivery in self.broker.replay(topic, since):
            try:
                msg = delivery.message or self._decode(delivery)
            except DecodeError as exc:
                logger.warning("replay skipped a malformed message on %s: %s", delivery.topic, exc)
                continue
            if delivery.position is not None:
                msg.position = delivery.position
            yield msg


def _expire(future: asyncio.Future[Message], request: Message, timeout: float) -> None:
    if not future.done():
        future.set_exception(
            RequestTimeout(
                f"no reply to {request.topic!r} within {timeout}s (request {request.id})"
            )
        )


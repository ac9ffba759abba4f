"""AgentMessageBus: the API users write against, built once on top of any :class:`Broker`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from amb_core import envelope
from amb_core.broker import INBOX_PREFIX, Broker, BrokerSubscription, Delivery
from amb_core.conversation import (
    _HANDLING,
    CONTROL,
    CONTROL_TO,
    EXPIRES,
    EXPIRY_TOLERANCE,
    GATHER,
    REPLY,
    SEQ,
    STREAM,
    TIMEOUT,
)
from amb_core.deadletters import DeadLetter, Redrive
from amb_core.errors import (
    DecodeError,
    NotConnected,
    RemoteError,
    RequestTimeout,
    UnsupportedFeature,
)
from amb_core.message import Message, new_id
from amb_core.observability._bus import observer_for
from amb_core.retry import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    ERROR_MESSAGE,
    ERROR_TYPE,
    MAX_ERROR_TEXT,
    ORIGINAL_TOPIC,
    RetryPolicy,
)
from amb_core.runtime import OnDemand, PendingReplies
from amb_core.topics import is_wildcard, validate_pattern, validate_topic

if TYPE_CHECKING:
    from amb_core.hooks import Observer, SubscriptionProbe

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Any]] | Callable[[Message], Any]
_NOTHING_TO_ACK = Delivery.ack
"""Deliveries that keep the base class's ack (core NATS, Redis pub/sub) skip the await."""


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
        self.streaming = inspect.isasyncgenfunction(handler)
        """An async generator handler answers a request with a stream (``bus.stream``)."""
        self._call = self._stream_call if self.streaming else _as_async(handler)
        self._broker_sub: BrokerSubscription | None = None
        self._closing = False
        self._busy = 0  # handlers running inline (max_concurrency == 1)
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_key: dict[str, asyncio.Task[None]] = {}
        """The last task started per ``Message.key`` (max_concurrency > 1 only)."""
        # metrics/tracing of this subscription (amb_core.observability); None when off
        observer = bus._observer
        self._probe: SubscriptionProbe | None = (
            observer.probe(self) if observer is not None else None
        )

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

    @property
    def in_flight(self) -> int:
        """Handler calls running now (or waiting to be retried)."""
        return self._busy + len(self._tasks)

    async def _deliver(
        self, delivery: Delivery, msg: Message | None = None,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """The one handle -> retry / dead-letter -> reply -> ack sequence of every message.

        The adapter calls it per message, in order (``msg`` None), and it returns once the bus
        has taken the message: with one handler at a time it runs the handler inline (no task,
        no extra coroutine frame: this is the hot path); with more it waits for a free slot and
        runs the same sequence again in a task, with ``msg`` decoded, ``after`` the task of
        the previous message with the same ``Message.key`` still running (messages of one key
        are handled one after the other, in order). Observability watches it through the
        probe's hooks (:mod:`amb_core.hooks`), counted in place.
        """
        bus = self.bus
        if msg is None:
            if self._closing:
                return  # not acknowledged: the broker keeps it where it keeps anything
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
            if self.max_concurrency > 1:
                await self._slots.acquire()
                key = msg.key
                previous = self._by_key.get(key) if key is not None else None
                task = asyncio.get_running_loop().create_task(
                    self._deliver(delivery, msg, previous)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if key is not None:
                    self._by_key[key] = task
                    task.add_done_callback(functools.partial(self._key_done, key))
                return
            self._busy += 1
        elif after is not None and not after.done():
            await asyncio.wait({after})
        deadline: float | None = None
        expired = False
        if msg.headers and TIMEOUT in msg.headers:
            deadline = bus._budget(msg)
            expired = deadline is None
        handling = _HANDLING.set((msg, deadline))
        probe = self._probe
        span: object = None
        timed = False
        try:
            if expired:  # it waited past its caller's deadline: nobody wants it any more
                if probe is not None:
                    probe.expired(msg)
                if bus._acks:
                    await bus._ack(delivery)
                return
            if probe is not None:
                probe.stats.delivered += 1
                if probe.tracing is not None:
                    span = probe.start_span(msg)
                if probe.skip:
                    probe.skip -= 1
                else:
                    probe.start_timing(msg)
                    timed = True
            while True:
                try:
                    result = await self._call(msg)
                except Exception as exc:
                    if probe is not None:
                        if timed:
                            probe.stop_timing()
                        probe.attempt_failed(msg, exc)
                    if not await bus._retry(self, msg, delivery, exc):
                        return  # dead-lettered, or the broker redelivers it later
                    timed = probe is not None  # retries are always timed
                    if probe is not None:
                        probe.start_timing(msg)
                    continue
                if probe is not None:
                    if timed:
                        probe.stop_timing()
                    probe.stats.succeeded += 1
                if (result is not None and msg.reply_to is not None) or (
                    bus._acks and type(delivery).ack is not _NOTHING_TO_ACK
                ):
                    await bus._succeeded(msg, delivery, result)
                return
        finally:
            _HANDLING.reset(handling)
            if span is not None and probe is not None:
                probe.end_span(span)
            if self.max_concurrency > 1:
                self._slots.release()
            else:
                self._busy -= 1
                if self._closing and not self._busy:
                    self._idle.set()

    def _key_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._by_key.get(key) is task:
            del self._by_key[key]

    async def _stream_call(self, msg: Message) -> Any:
        """An async generator handler: a stream request gets each item as a chunk, then the
        end (or the error); a plain request gets the list of items as its one reply; a plain
        message just runs it. The stream runs in a task of its own, so the caller can cancel
        it (``bus.stream`` broken off) without touching the subscription."""
        bus = self.bus
        if msg.reply_to is None or STREAM not in msg.headers:
            items = [item async for item in self.handler(msg)]  # type: ignore[union-attr]
            return items if msg.reply_to is not None else None
        task = asyncio.get_running_loop().create_task(bus._serve_stream(self, msg))
        bus._streaming[msg.id] = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            bus._streaming.pop(msg.id, None)
        if not task.cancelled():
            task.result()  # a bug below the handler, if anything
        return None

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
        self._acks = not broker.in_process
        """Deliveries are acknowledged (in-process brokers hand over messages, not leases)."""
        self._headers = broker.capabilities.headers
        self._prefix = broker.header_prefix
        self._max_payload = broker.capabilities.max_payload
        self._checked_topics: set[str] = set()
        self._subscriptions: set[Subscription] = set()
        self._pending: PendingReplies[str, Message] = PendingReplies()
        """Requests waiting for a reply on the inbox, by request id (replies carry it as their
        causation id, so concurrent requests may share a correlation id)."""
        self._inbox: OnDemand[str] = OnDemand(self._open_inbox)
        self._kept_dead_letters: set[str] = set()
        self._closing: asyncio.Future[None] | None = None
        self._streams: dict[str, _Chunks] = {}
        """Streams this bus reads (``stream``), by request id."""
        self._gathers: dict[str, _Gathering] = {}
        self._streaming: dict[str, asyncio.Task[None]] = {}
        """Streams this bus's handlers serve, by request id (to cancel them)."""
        self._background: set[asyncio.Future[None]] = set()
        self._observer: Observer | None = observer_for(self, observer)

    def attach_observer(self, observer: Observer | None) -> None:
        """Metrics and tracing for this bus and its subscriptions, existing ones included
        (:func:`amb_core.observability.instrument` calls it); None turns them off."""
        self._observer = observer
        for sub in list(self._subscriptions):
            sub._probe = observer.probe(sub) if observer is not None else None

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
        if self._closing is None:
            if not self._connected:
                return
            self._closing = asyncio.ensure_future(self._close(timeout))
        closing = self._closing
        try:
            await asyncio.shield(closing)  # concurrent calls all wait for the one close
        finally:
            if closing.done() and self._closing is closing:
                self._closing = None

    async def _close(self, timeout: float | None) -> None:
        timeout = self.drain_timeout if timeout is None else timeout
        await asyncio.gather(
            *(self._stop_subscription(sub, timeout) for sub in list(self._subscriptions))
        )
        self._pending.fail_all(NotConnected("the bus was closed before the reply came"))
        self._inbox.reset()
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
        handling = _HANDLING.get()
        if handling is not None:
            _inherit(msg, handling[0])
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
        destination = self._dead_letter_destination(sub)
        if destination not in self._kept_dead_letters:
            await self.broker.keep_dead_letters(destination)
            self._kept_dead_letters.add(destination)
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

    async def _succeeded(self, msg: Message, delivery: Delivery, result: Any) -> None:
        """After the handler returned: the reply (if any), then the ack."""
        if result is not None and msg.reply_to is not None:
            await self._send_reply(msg, result)
        if self._acks and type(delivery).ack is not _NOTHING_TO_ACK:
            await self._ack(delivery)

    async def _retry(
        self, sub: Subscription, msg: Message, delivery: Delivery, exc: Exception
    ) -> bool:
        """After a failed attempt: True when the bus is to try again now (after the policy's
        delay, ``msg.attempt`` counted up); False when the broker took the retry or the
        message was dead-lettered after its last attempt."""
        policy = sub.retry
        if msg.attempt >= policy.max_attempts:
            await self._dead_letter(sub, msg, delivery, exc)
            return False
        delay = policy.delay_before(msg.attempt + 1)
        logger.info(
            "handler %r failed on %s (attempt %d of %d, retry in %.2fs): %r",
            sub.handler, msg.id, msg.attempt, policy.max_attempts, delay, exc,
        )
        if sub._probe is not None:
            sub._probe.retrying(msg, delay)
        if await self._retry_later(delivery, delay):
            return False  # the broker redelivers it later, with its delivery count
        await asyncio.sleep(delay)
        msg.attempt += 1
        return True

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
        headers[DEAD_LETTERED_AT] = f"{time.time():.6f}"
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
        if msg.reply_to is not None:  # its caller waits: tell it, rather than let it time out
            headers_of_error = _error_headers(exc)
            headers_of_error[REPLY] = "error"
            await self._send_reply(msg, Message(topic=msg.reply_to, headers=headers_of_error))
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
        if self._acks:
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
        request, timeout = self._prepare(msg, timeout)
        if self._observer is not None:  # round-trip metrics and a CLIENT span around it all
            return await self._observer.request(request, timeout, self._request)
        return await self._request(request, timeout)

    def _prepare(self, msg: Message, timeout: float | None) -> tuple[Message, float]:
        """The request to send for ``msg``: in the conversation of the handled message (if
        any), with a budget of ``timeout`` (default the bus's), at most what the handled
        message's budget has left."""
        self._require_connected()
        if msg.topic not in self._checked_topics:
            self._check_topic(msg.topic)
        timeout = self.request_timeout if timeout is None else timeout
        request = msg.copy()
        handling = _HANDLING.get()
        if handling is not None:
            _inherit(request, handling[0])
            deadline = handling[1]
            if deadline is not None:
                timeout = min(timeout, max(deadline - time.monotonic(), 0.0))
        if request.correlation_id is None:
            request.correlation_id = request.id
        request.headers[TIMEOUT] = f"{timeout:.3f}"
        request.headers[EXPIRES] = f"{time.time() + timeout:.3f}"
        return request, timeout

    def _budget(self, msg: Message) -> float | None:
        """The local deadline (``time.monotonic``) of a message that carries a budget, or
        None when it waited in a queue past its sender's deadline (it is then not handled)."""
        headers = msg.headers
        try:
            expires = float(headers.get(EXPIRES, "inf"))
            budget = float(headers[TIMEOUT])
        except ValueError:
            return time.monotonic() + self.request_timeout  # a foreign header: ignore it
        if time.time() > expires + EXPIRY_TOLERANCE:
            logger.info("not handling %s on %s: its caller's deadline passed %.1fs ago",
                        msg.id, msg.topic, time.time() - expires)
            return None
        return time.monotonic() + budget

    async def _request(self, request: Message, timeout: float) -> Message:
        if self.broker.capabilities.native_request_reply:
            body, headers = self._encode(request)
            delivery = await self.broker.request(request.topic, body, headers, timeout)
            return _checked(self._decode(delivery), request)
        request.reply_to = await self._inbox.get()
        if request.id in self._pending:  # the same message requested twice at once
            request.id = new_id()
        future = self._pending.expect(request.id, timeout, repr(request.topic))
        try:
            await self.publish(request)
            return _checked(await future, request)
        finally:
            self._pending.discard(request.id)

    async def _open_inbox(self) -> str:
        inbox = INBOX_PREFIX + self.id
        await self.broker.subscribe(inbox, self._on_reply, prefetch=256)
        return inbox

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            reply = delivery.message or self._decode(delivery)
        except DecodeError:
            logger.warning("dropped a malformed reply on %s", delivery.topic)
            return
        key = reply.causation_id or ""
        if not self._pending.resolve(key, reply) and not self._conversation_reply(key, reply):
            logger.debug("dropped a reply to %s: its request is gone (timed out?)", key)
        if self._acks:
            await self._ack(delivery)

    def _conversation_reply(self, key: str, reply: Message) -> bool:
        """A reply to a stream or gather of ours, or a cancellation for a stream we serve."""
        chunks = self._streams.get(key)
        if chunks is not None:
            chunks.put(reply)
            return True
        gathering = self._gathers.get(key)
        if gathering is not None:
            gathering.add(reply)
            return True
        headers = reply.headers
        if headers.get(CONTROL) == "cancel":
            task = self._streaming.get(key)
            if task is not None:
                logger.debug("the caller of stream %s stopped reading: cancelling it", key)
                task.cancel()
            return True
        control_to = headers.get(CONTROL_TO)
        if control_to is not None and headers.get(REPLY) == "chunk":
            self._spawn(self._cancel_stream(control_to, key))  # its reader is gone
            return True
        return False

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_stream(self, control_to: str, key: str) -> None:
        """Tell the bus serving stream ``key`` (at its inbox ``control_to``) to stop."""
        cancel = Message(topic=control_to, headers={CONTROL: "cancel"}, causation_id=key)
        try:
            if self._local:
                blocked = self.broker.publish_local(cancel)
                if blocked is not None:
                    await blocked
            else:
                body, headers = self._encode(cancel)
                await self.broker.send_reply(control_to, body, headers)
        except Exception as exc:
            logger.debug("could not cancel stream %s: %r", key, exc)

    # --- streams and gather ------------------------------------------------------------------

    async def stream(
        self, msg: Message, *, timeout: float | None = None, idle_timeout: float | None = None
    ) -> AsyncGenerator[Message, None]:
        """Ask the handler of ``msg.topic`` for a stream (an async generator handler) and
        yield its chunks in order, until it ends. The handler's exception raises
        :class:`RemoteError` here; :class:`RequestTimeout` when the whole stream takes longer
        than ``timeout`` (default the bus's request timeout, at most what the handled
        message's budget has left) or no chunk comes for ``idle_timeout`` seconds. Breaking
        out of the loop (or being cancelled) cancels the handler."""
        request, timeout = self._prepare(msg, timeout)
        request.headers[STREAM] = "1"
        request.reply_to = await self._inbox.get()
        chunks = _Chunks()
        self._streams[request.id] = chunks
        ended = False
        control_to: str | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.publish(request)
            expected = 0
            while True:
                wait = deadline - loop.time()
                if idle_timeout is not None:
                    wait = min(wait, idle_timeout)
                chunk = await chunks.get(wait, request, expected)
                control_to = chunk.headers.get(CONTROL_TO, control_to)
                kind = chunk.headers.get(REPLY)
                expected += 1
                if kind == "end":
                    ended = True
                    return
                if kind == "error":
                    ended = True
                    raise _remote_error(chunk, request)
                yield chunk
        finally:
            self._streams.pop(request.id, None)
            if not ended and control_to is not None:
                self._spawn(self._cancel_stream(control_to, request.id))

    async def _serve_stream(self, sub: Subscription, request: Message) -> None:
        """Run an async generator handler for a stream request: each item a chunk, in order,
        then the end; its exception becomes the stream's error (not retried: chunks already
        went out); a cancellation (the caller stopped reading) closes the generator."""
        control_to = await self._inbox.get()
        generator: AsyncGenerator[Any, None] = sub.handler(request)  # type: ignore[assignment]
        seq = 0
        try:
            async for item in generator:
                await self._send_chunk(request, item, seq, "chunk", control_to)
                seq += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("stream handler %r failed on %s after %d chunk(s): %r",
                           sub.handler, request.id, seq, exc)
            await self._send_chunk(request, _error_headers(exc), seq, "error", control_to)
            return
        finally:
            await generator.aclose()
        await self._send_chunk(request, None, seq, "end", control_to)

    async def _send_chunk(self, request: Message, item: Any, seq: int, kind: str,
                          control_to: str) -> None:
        if kind == "error":
            chunk = Message(topic=request.reply_to or "", headers=dict(item))
        elif isinstance(item, Message):
            chunk = item.copy()
        else:
            chunk = Message(topic=request.reply_to or "", payload=item)
        chunk.headers[REPLY] = kind
        chunk.headers[SEQ] = str(seq)
        chunk.headers[CONTROL_TO] = control_to
        await self._send_reply(request, chunk)

    async def gather(
        self, msg: Message, *, timeout: float | None = None, max_replies: int | None = None
    ) -> Gathered:
        """Ask every subscriber of ``msg.topic`` (plain subscriptions; a consumer group
        answers once) and collect their replies until ``max_replies`` came or ``timeout``
        (default the bus's request timeout, within the handled message's budget) ran out,
        whichever is first. A responder whose handler raised is reported in
        :attr:`Gathered.errors`, the others' replies are kept."""
        if max_replies is not None and max_replies < 1:
            raise ValueError("max_replies must be at least 1")
        request, timeout = self._prepare(msg, timeout)
        request.headers[GATHER] = "1"
        request.reply_to = await self._inbox.get()
        gathering = _Gathering(max_replies, request)
        self._gathers[request.id] = gathering
        try:
            await self.publish(request)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(gathering.full), timeout)
        finally:
            self._gathers.pop(request.id, None)
        return Gathered(gathering.replies, gathering.errors)


    # --- dead letters ------------------------------------------------------------------------

    async def dead_letters(
        self, topic: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        """The letters kept at dead-letter destination ``topic`` (default: the broker's),
        oldest first, without removing them. Raises :class:`UnsupportedFeature` on brokers
        that keep nothing to list."""
        self._require_connected()
        destination = validate_topic(topic or self.broker.default_dead_letter_topic)
        letters: list[DeadLetter] = []
        async for delivery in self.broker.dead_letters(destination):
            try:
                msg = delivery.message or self._decode(delivery)
            except DecodeError as exc:
                logger.warning("unreadable dead letter at %s: %s", destination, exc)
                continue
            if delivery.position is not None:
                msg.position = delivery.position
            letters.append(DeadLetter.from_message(msg))
            if limit is not None and len(letters) >= limit:
                break
        return letters

    async def redrive_dead_letters(
        self, topic: str | None = None, *, limit: int | None = None
    ) -> Redrive:
        """Publish the letters at ``topic`` (default: the broker's destination) back to their
        original topics with a fresh attempt count, then remove them from the destination
        where the broker can (:attr:`Redrive.kept` says why not, elsewhere). Letters with no
        original topic are left where they are."""
        destination = validate_topic(topic or self.broker.default_dead_letter_topic)
        letters = [
            letter for letter in await self.dead_letters(destination, limit=limit)
            if letter.original_topic
        ]
        for letter in letters:
            await self.publish(letter.redriven())
        positions = [letter.position for letter in letters if letter.position is not None]
        if not letters:
            return Redrive(0, 0)
        try:
            removed = await self.broker.remove_dead_letters(destination, positions)
        except UnsupportedFeature as exc:
            return Redrive(len(letters), 0, kept=str(exc))
        kept = None if removed == len(letters) else (
            f"{len(letters) - removed} letter(s) could not be removed from {destination!r}"
        )
        return Redrive(len(letters), removed, kept)

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
        # A broker seeks by its own record time (set when the record was written, a hair
        # after the message's); the message's own timestamp decides what is "since".
        not_before = since.timestamp() if isinstance(since, datetime) else None
        async for delivery in self.broker.replay(topic, since):
            try:
                msg = delivery.message or self._decode(delivery)
            except DecodeError as exc:
                logger.warning("replay skipped a malformed message on %s: %s", delivery.topic, exc)
                continue
            if not_before is not None and 0.0 < msg.timestamp < not_before:
                continue
            if delivery.position is not None:
                msg.position = delivery.position
            yield msg


@dataclass
class Gathered:
    """What :meth:`AgentMessageBus.gather` collected: each responder's reply, and the errors
    of those whose handler raised (one :class:`RemoteError` each)."""

    replies: list[Message] = field(default_factory=list)
    errors: list[RemoteError] = field(default_factory=list)


class _Gathering:
    __slots__ = ("_max", "_request", "errors", "full", "replies")

    def __init__(self, max_replies: int | None, request: Message) -> None:
        self._max = max_replies
        self._request = request
        self.replies: list[Message] = []
        self.errors: list[RemoteError] = []
        self.full: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, reply: Message) -> None:
        if reply.headers.get(REPLY) == "error":
            self.errors.append(_remote_error(reply, self._request))
        else:
            self.replies.append(reply)
        count = len(self.replies) + len(self.errors)
        if self._max is not None and count >= self._max and not self.full.done():
            self.full.set_result(None)


class _Chunks:
    """A stream's replies as they come, handed out in their order (``amb-seq``): a chunk that
    overtook another waits for it, a duplicate is dropped. No timer while chunks are queued."""

    __slots__ = ("_early", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Message] = deque()
        self._early: dict[int, Message] = {}
        self._waiter: asyncio.Future[bool] | None = None

    def put(self, chunk: Message) -> None:
        self._items.append(chunk)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def get(self, wait: float, request: Message, expected: int) -> Message:
        while True:
            chunk = self._early.pop(expected, None)
            if chunk is not None:
                return chunk
            while self._items:
                item = self._items.popleft()
                try:
                    seq = int(item.headers.get(SEQ, expected))
                except ValueError:
                    seq = expected
                if seq == expected:
                    return item
                if seq > expected:
                    self._early[seq] = item
            if wait <= 0:
                raise RequestTimeout(f"the stream from {request.topic!r} timed out "
                                     f"(request {request.id})")
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait, _settle, waiter, False)
            try:
                came = await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not came:
                raise RequestTimeout(f"no chunk of the stream from {request.topic!r} within "
                                     f"{wait:.1f}s (request {request.id})")


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _inherit(msg: Message, handled: Message) -> None:
    """A message sent from inside a handler joins the handled message's conversation."""
    if msg.id == handled.id:
        return  # the handled message itself (a dead letter is a copy of it)
    if msg.causation_id is None:
        msg.causation_id = handled.id
    if msg.correlation_id is None:
        msg.correlation_id = handled.correlation_id or handled.id


def _error_headers(exc: BaseException) -> dict[str, str]:
    return {ERROR_TYPE: type(exc).__qualname__, ERROR_MESSAGE: str(exc)[:MAX_ERROR_TEXT]}


def _remote_error(reply: Message, request: Message) -> RemoteError:
    headers = reply.headers
    return RemoteError(headers.get(ERROR_TYPE, "Exception"), headers.get(ERROR_MESSAGE, ""),
                       request.topic)


def _checked(reply: Message, request: Message) -> Message:
    """The reply, or the :class:`RemoteError` its handler's failure stands for."""
    if reply.headers and reply.headers.get(REPLY) == "error":
        raise _remote_error(reply, request)
    return reply

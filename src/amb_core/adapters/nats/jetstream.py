"""JetStream's part of NATSBroker: streams, publish acks, durable pull consumers, replay, and
dead letters kept for their reader.

- publish goes to a stream and returns once the server acknowledged it (stored). It carries
  ``Nats-Msg-Id`` (``<id>:<topic>``), so publishing the same message again within the stream's
  duplicate window is stored once. Concurrent publishers (``asyncio.gather``) share the
  connection and their acks are pipelined. ``max_pending_acks=N`` lets publish return before
  the ack with up to N acks outstanding (errors surface on a later publish, ``flush()`` or
  ``close()``).
- streams: by default one stream per first topic segment, ``AMB_<root>`` with subjects
  ``<root>`` and ``<root>.>``, created on first use (or an existing stream that already captures
  the topic is reused). ``stream="NAME"`` (with ``stream_subjects``) uses one stream instead.
- consumer group = a durable pull consumer per (group, pattern) on that stream, explicit ack.
  A failed attempt is nak'ed with the retry policy's delay (the broker redelivers, and its
  delivery count becomes the message's attempt). Messages a member holds longer than half of
  ``ack_wait`` get in-progress acks while they wait or run (a :class:`LeaseKeeper`); a member
  that dies without acking has its messages redelivered to another member after ``ack_wait``;
  a member that unsubscribes naks what it held, for immediate redelivery.
- dead letters: :meth:`JetStream.keep_dead_letters` creates the topic's stream and a marker
  consumer (``amb_dlq_<hash>``, never read) that records on the server that the topic is a
  dead-letter destination; a group created on such a topic starts at its oldest letter.
- plain subscribe is still a core subscription (live messages, at-most-once);
  ``bus.replay(topic, since)`` reads the stream with an ordered consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

from amb_core.adapters.nats.headers import (
    DESCRIPTION,
    MSG_ID,
    PENDING_MESSAGES,
    REPLY_TO,
    STATUS,
    delivered_headers,
)
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.errors import (
    BrokerConnectionError,
    NoResponders,
    NotConnected,
    UnsupportedFeature,
)
from amb_core.runtime import Deadlines, LeaseKeeper, OnDemand

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription
    from nats.js.manager import JetStreamManager

    from amb_core.adapters.nats.broker import NATSBroker

logger = logging.getLogger(__name__)

_JS_API = "$JS.API"
_ACK = b"+ACK"
_PROGRESS = b"+WPI"
_NAK = b"-NAK"
_STREAM_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")
_CONSUMER_EXISTS = (10013, 10148)
"""a durable consumer of that name exists (with another configuration)"""
_NOT_IN_STREAM = 10093
"""a consumer's filter subject is not among its stream's subjects"""
_TOO_FEW_SERVERS = (10023, 10074)
"""insufficient resources (fewer JetStream servers than replicas); replicas > 1 on a server
that is not clustered"""
CLUSTER_REPLICAS = 3


def _is_not_found(exc: BaseException) -> bool:
    from nats.js.errors import NotFoundError

    return isinstance(exc, NotFoundError)


class JetStream:
    """The JetStream state of one broker: its streams, outstanding publish acks, group members
    and kept dead-letter topics."""

    def __init__(self, broker: NATSBroker) -> None:
        self.broker = broker
        self.header_id = broker.header_prefix + "id"
        self.streams: dict[str, str] = {}
        """first topic segment (or a whole topic, after an overlap) -> stream name"""
        self._stream_lock = asyncio.Lock()
        self.acks: dict[str, asyncio.Future[int]] = {}
        """ack token -> its publish's future, while the ack is outstanding"""
        self.deadlines = Deadlines()
        """timeouts of outstanding publish acks"""
        self._ack_inbox: OnDemand[str] = OnDemand(self._open_ack_inbox)
        self._tokens = itertools.count(1)
        self.window: asyncio.Semaphore | None = None
        self.window_failures: deque[BaseException] = deque()
        self.pulls: set[PullSubscription] = set()
        self.kept: set[str] = set()
        """dead-letter topics this broker was told to keep"""
        self._watcher: asyncio.Task[None] | None = None

    def api(self) -> JetStreamManager:
        return self.broker._conn().jetstream(timeout=self.broker.publish_timeout)

    def start(self) -> None:
        if self.broker.max_pending_acks:
            self.window = asyncio.Semaphore(self.broker.max_pending_acks)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_pulls())

    async def close(self) -> None:
        for sub in list(self.pulls):
            with contextlib.suppress(Exception):
                await sub.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.acks:
            with contextlib.suppress(Exception):
                await self.flush()
        for future in list(self.acks.values()):
            if not future.done():
                future.set_exception(NotConnected("the NATS connection was closed"))
        self.acks.clear()
        self.deadlines.clear()
        self._ack_inbox.reset()
        self.streams.clear()

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        broker = self.broker
        broker._conn()
        window = self.window
        if window is not None and self.window_failures:
            failure = self.window_failures.popleft()
            raise BrokerConnectionError(
                f"an earlier JetStream publish was not acknowledged: {failure!r}"
            ) from failure
        streams = self.streams
        root = topic.split(".", 1)[0]
        if root not in streams and topic not in streams:
            await self.stream_for(topic)
        msg_id = headers.get(self.header_id)
        # The adapter's own header, written after the caller's: their dict stays as it is.
        extra = (MSG_ID, f"{msg_id}:{topic}") if msg_id is not None else None
        timeout = broker.publish_timeout
        deadline = 0.0
        pause = 0.0
        while True:
            prefix = self._ack_inbox.value or await self._ack_inbox.get()
            token = str(next(self._tokens))
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            if window is not None:
                await window.acquire()
                future.add_done_callback(self._window_done)
            self.acks[token] = future
            self.deadlines.add(timeout, future,
                               functools.partial(self._ack_expired, token, topic))
            try:
                await broker._send(topic, body, headers, prefix + token, extra)
            except Exception as exc:
                self.acks.pop(token, None)
                future.cancel()
                mapped = broker._errors.translate(exc, f"publish to {topic!r}")
                if mapped is exc:
                    raise
                raise mapped from exc
            if window is not None:
                return
            try:
                await future
                return
            except (NoResponders, TimeoutError) as exc:
                # No answer at once (no responders): the stream may be gone (deleted),
                # JetStream restarting, or, on a cluster, the stream electing a leader after
                # its leader's server died; no answer in time: that server may have died with
                # the publish. Resend (the same Nats-Msg-Id, so it is stored once) with a
                # growing pause, for publish_timeout on one server, leader_wait on a cluster.
                now = time.monotonic()
                if not deadline:
                    clustered = len(broker._conn().servers) > 1
                    if isinstance(exc, TimeoutError) and (extra is None or not clustered):
                        raise
                    deadline = now + (broker.leader_wait if clustered
                                      else broker.publish_timeout)
                    if isinstance(exc, NoResponders):
                        await self._recreate_if_gone(topic, deadline)
                elif now >= deadline:
                    if isinstance(exc, TimeoutError):
                        raise
                    raise BrokerConnectionError(
                        f"JetStream did not answer for {topic!r}: no stream captures it, or "
                        "JetStream (or the stream's leader) is not available"
                    ) from None
                else:
                    pause = min(pause * 2 or 0.05, 0.5, deadline - now)
                    await asyncio.sleep(pause)
                timeout = min(max(deadline - time.monotonic(), 0.05), broker.publish_timeout)

    async def _recreate_if_gone(self, topic: str, deadline: float) -> None:
        """After "no responders": create the topic's stream again if it was deleted. A stream
        that exists (without a leader for now) or a check that fails is left to the resends."""
        name = self.streams.get(topic) or self.streams.get(topic.split(".", 1)[0])
        if name is None:
            return
        try:
            await self.broker._conn().jetstream(
                timeout=max(min(deadline - time.monotonic(), 1.0), 0.1)).stream_info(name)
        except Exception as exc:
            if not _is_not_found(exc):
                return
        else:
            return
        self._forget_stream(topic)
        with contextlib.suppress(BrokerConnectionError):
            await self.stream_for(topic)

    def _ack_expired(self, token: str, topic: str, future: asyncio.Future[int]) -> None:
        self.acks.pop(token, None)
        future.set_exception(TimeoutError(
            f"JetStream did not acknowledge a publish to {topic!r} within "
            f"{self.broker.publish_timeout}s; it may or may not be stored (publishing the same "
            "message again is deduplicated)"
        ))

    def _window_done(self, future: asyncio.Future[int]) -> None:
        assert self.window is not None
        self.window.release()
        if not future.cancelled() and future.exception() is not None:
            self.window_failures.append(future.exception())  # type: ignore[arg-type]

    async def flush(self) -> None:
        pending = [f for f in self.acks.values() if not f.done()]
        if pending:
            await asyncio.wait(pending)
        if self.window_failures:
            failures = list(self.window_failures)
            self.window_failures.clear()
            raise BrokerConnectionError(
                f"{len(failures)} JetStream publish(es) were not acknowledged; first: "
                f"{failures[0]!r}"
            ) from failures[0]

    async def _open_ack_inbox(self) -> str:
        from nats.nuid import NUID

        prefix = f"{self.broker._ack_marker}{NUID().next().decode()}."
        await self.broker._listen(prefix + "*", self._on_ack)
        return prefix

    def _on_ack(self, subject: str, reply: str, headers: dict[str, str] | None,
                data: bytes) -> None:
        prefix = self._ack_inbox.value or ""
        future = self.acks.pop(subject[len(prefix):], None)
        if future is None or future.done():
            return
        if headers and headers.get(STATUS) == "503":
            future.set_exception(NoResponders("no JetStream stream answered"))
            return
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            future.set_exception(BrokerConnectionError(f"bad JetStream ack: {data[:100]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            description = error.get("description", error)
            future.set_exception(
                BrokerConnectionError(f"JetStream refused a publish: {description}")
            )
        else:
            future.set_result(int(answer.get("seq", 0)))

    # --- streams ---------------------------------------------------------------------------

    def _root_stream_name(self, root: str) -> str:
        prefix = self.broker.stream_prefix
        if _STREAM_NAME_OK.fullmatch(root):
            return prefix + root
        digest = hashlib.sha1(root.encode()).hexdigest()[:8]
        cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", root)[:40]
        return f"{prefix}{cleaned}_{digest}"

    def _forget_stream(self, topic: str) -> None:
        self.streams.pop(topic.split(".", 1)[0], None)
        self.streams.pop(topic, None)

    async def stream_for(self, pattern: str) -> str:
        """The stream that holds ``pattern``'s messages, created if need be."""
        root = pattern.split(".", 1)[0]
        name = self.streams.get(root) or self.streams.get(pattern)
        if name is not None:
            return name
        async with self._stream_lock:
            name = self.streams.get(root) or self.streams.get(pattern)
            if name is None:
                with self.broker._errors.mapped(f"JetStream: the stream for {pattern!r}"):
                    name = await self._ensure_stream(pattern, root)
            return name

    def replicas(self) -> int:
        """Copies of a stream created now: ``replicas`` if given, else 3 when the client
        knows of three or more servers (those it was given and those the cluster announced in
        its INFO ``connect_urls``), else 1. Durable consumers inherit their stream's."""
        if self.broker.replicas is not None:
            return self.broker.replicas
        known = {server.netloc for server in self.broker._conn().servers}
        return CLUSTER_REPLICAS if len(known) >= CLUSTER_REPLICAS else 1

    def _stream_config(self, name: str, subjects: list[str], replicas: int) -> Any:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        broker = self.broker
        return StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if broker.storage == "file" else StorageType.MEMORY,
            max_age=broker.stream_max_age,
            duplicate_window=broker.duplicate_window,
            num_replicas=replicas,
        )

    async def _add_stream(self, js: JetStreamManager, name: str, subjects: list[str]) -> None:
        """Create a stream with :meth:`replicas` copies. When that number was a guess (no
        ``replicas`` option) and the servers have too few JetStream peers, create it with one
        copy and say so."""
        from nats.js.errors import APIError

        replicas = self.replicas()
        try:
            await js.add_stream(self._stream_config(name, subjects, replicas))
        except APIError as exc:
            if replicas == 1 or self.broker.replicas is not None or \
                    exc.err_code not in _TOO_FEW_SERVERS:
                raise
            logger.warning("stream %s: %d replicas refused (%s); created with 1 replica "
                           "(pass replicas=... to choose)", name, replicas, exc.description)
            await js.add_stream(self._stream_config(name, subjects, 1))
            return
        if replicas > 1:
            logger.debug("stream %s created with %d replicas", name, replicas)

    async def _ensure_stream(self, pattern: str, root: str) -> str:
        from nats.js.errors import APIError, NotFoundError

        js = self.api()
        stream, subjects = self.broker.stream, self.broker.stream_subjects
        if stream is not None:
            try:
                await js.stream_info(stream)
            except NotFoundError:
                if not subjects:
                    raise UnsupportedFeature(
                        f"stream {stream!r} does not exist; create it, or pass "
                        "stream_subjects so the adapter creates it"
                    ) from None
                await self._add_stream(js, stream, subjects)
            self.streams[root] = stream
            return stream
        if "*" in root or ">" in root:
            raise UnsupportedFeature(
                f"pattern {pattern!r}: JetStream groups and replay need a literal first "
                "segment (one stream per first segment), or one stream for everything "
                "(stream=..., stream_subjects=[...])"
            )
        name = self._root_stream_name(root)
        try:
            await self._add_stream(js, name, [root, f"{root}.>"])
        except APIError as exc:
            if exc.err_code == 10058:  # name in use with another config: reuse it
                self.streams[root] = name
                return name
            if exc.err_code != 10065:  # 10065: subjects overlap an existing stream
                raise
            probe = pattern if not ("*" in pattern or ">" in pattern) else f"{root}.>"
            existing = await js.find_stream_name_by_subject(probe)
            logger.info("reusing the existing stream %s for %s", existing, pattern)
            self.streams[pattern] = existing
            return existing
        self.streams[root] = name
        return name

    # --- consumer groups -------------------------------------------------------------------

    @staticmethod
    def consumer_name(group: str, pattern: str) -> str:
        digest = hashlib.sha1(f"{group}\0{pattern}".encode()).hexdigest()[:12]
        cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", group)[:48]
        return f"{cleaned}_{digest}"

    @staticmethod
    def marker_name(topic: str) -> str:
        """The never-read consumer that marks ``topic`` as a kept dead-letter destination."""
        return f"amb_dlq_{hashlib.sha1(topic.encode()).hexdigest()[:16]}"

    async def subscribe_group(self, pattern: str, group: str, handler: DeliveryHandler,
                              prefetch: int) -> PullSubscription:
        stream = await self.stream_for(pattern)
        with self.broker._errors.mapped(f"JetStream: group {group!r} on {pattern!r}"):
            consumer = await self._ensure_consumer(stream, pattern, group)
        pull = PullSubscription(self, stream, consumer, handler, prefetch)
        await pull.start()
        return pull

    async def _ensure_consumer(self, stream: str, pattern: str, group: str) -> str:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import APIError, NotFoundError

        name = self.consumer_name(group, pattern)
        js = self.api()
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(stream, name)
            logger.debug("group %r on %s: durable consumer %s exists (ack_wait=%ss)", group,
                         pattern, name, info.config.ack_wait)
            return name
        broker = self.broker
        start_all = broker.group_start == "all" or await self._is_kept(stream, pattern)
        config = ConsumerConfig(
            durable_name=name,
            description=f"amb-core group {group!r} on {pattern!r}",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=broker.ack_wait,
            deliver_policy=DeliverPolicy.ALL if start_all else DeliverPolicy.NEW,
            filter_subject=pattern,
            max_deliver=-1,  # the bus dead-letters after its RetryPolicy's last attempt
            max_ack_pending=broker.max_ack_pending,
        )
        try:
            await js.add_consumer(stream, config)
        except APIError as exc:
            if exc.err_code not in _CONSUMER_EXISTS:
                raise
            info = await js.consumer_info(stream, name)  # created meanwhile by another member
            logger.info(
                "group %r on %s: reusing durable consumer %s as configured on the server "
                "(ack_wait=%ss)", group, pattern, name, info.config.ack_wait,
            )
        return name

    async def _is_kept(self, stream: str, topic: str) -> bool:
        if topic in self.kept:
            return True
        if "*" in topic or ">" in topic:
            return False
        try:
            await self.api().consumer_info(stream, self.marker_name(topic))
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise
        return True

    async def delete_group(self, pattern: str, group: str) -> None:
        """Delete the group's durable consumer (and with it its position and pending acks;
        the stream's messages stay). A group that does not exist is not an error."""
        from nats.js.errors import NotFoundError

        with self.broker._errors.mapped(f"JetStream: delete group {group!r} on {pattern!r}"):
            js = self.api()
            root = pattern.split(".", 1)[0]
            stream = self.streams.get(root) or self.streams.get(pattern) or self.broker.stream
            if stream is None:
                probe = pattern if not ("*" in pattern or ">" in pattern) else f"{root}.>"
                try:
                    stream = await js.find_stream_name_by_subject(probe)
                except NotFoundError:
                    return
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(stream, self.consumer_name(group, pattern))

    # --- dead letters ------------------------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import APIError

        if topic in self.kept:
            return
        stream = await self.stream_for(topic)
        if "*" not in topic and ">" not in topic:
            config = ConsumerConfig(
                durable_name=self.marker_name(topic),
                description=f"amb-core: {topic!r} is a dead-letter destination (never read)",
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.NEW,
                filter_subject=topic,
            )
            with self.broker._errors.mapped(f"JetStream: keep dead letters at {topic!r}"):
                try:
                    await self.api().add_consumer(stream, config)
                except APIError as exc:
                    if exc.err_code == _NOT_IN_STREAM:
                        raise UnsupportedFeature(
                            f"stream {stream!r} does not capture the dead-letter topic "
                            f"{topic!r}, so its letters could not be kept: add it to "
                            "stream_subjects"
                        ) from None
                    if exc.err_code not in _CONSUMER_EXISTS:
                        raise
        self.kept.add(topic)

    async def remove_messages(self, topic: str, positions: list[int | str]) -> int:
        """Delete the stream messages at ``positions`` (stream sequences) of ``topic``."""
        stream = await self.stream_for(topic)
        removed = 0
        with self.broker._errors.mapped(f"JetStream: remove letters from {topic!r}"):
            js = self.api()
            for position in positions:
                try:
                    await js.delete_msg(stream, int(position))
                except Exception as exc:
                    if _is_not_found(exc) or getattr(exc, "err_code", None) == 10037:
                        continue  # already gone
                    raise
                removed += 1
        return removed

    # --- replay ----------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        broker = self.broker
        nc = broker._conn()
        stream = await self.stream_for(topic)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if isinstance(since, datetime):
            moment = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                    opt_start_time=moment.astimezone(timezone.utc))
        elif since is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(int(since), 1))
        with broker._errors.mapped(f"JetStream: replay {topic!r}"):
            js = nc.jetstream(timeout=broker.publish_timeout)
            sub = await js.subscribe(topic, stream=stream, ordered_consumer=True, config=config)
        try:
            with broker._errors.mapped(f"JetStream: replay {topic!r}"):
                info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            if info.num_pending == 0 and not delivered and sub.pending_msgs == 0:
                return
            while True:
                with broker._errors.mapped(f"JetStream: replay {topic!r}"):
                    msg = await sub.next_msg(timeout=max(broker.publish_timeout, 5.0))
                metadata = msg.metadata
                yield Delivery(msg.subject, msg.data, delivered_headers(msg.headers),
                               position=metadata.sequence.stream,
                               delivery_count=metadata.num_delivered)
                if metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- group members: restart lost pulls -----------------------------------------------------

    def restart_pulls(self) -> None:
        """After a reconnect the server forgot our waiting pull requests."""
        for sub in list(self.pulls):
            sub.restart_pull()

    async def _watch_pulls(self) -> None:
        """A pull request the server neither filled nor ended (408) within its expiry plus a
        margin was lost: send another."""
        margin = self.broker.pull_expires + 5
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in list(self.pulls):
                if sub.outstanding and now - sub.last_activity > margin:
                    sub.restart_pull()


class JetStreamDelivery(Delivery):
    __slots__ = ("_ack_subject", "_owner")

    def __init__(self, owner: PullSubscription, subject: str, ack_subject: str, data: bytes,
                 headers: dict[str, str], delivered: int, sequence: int,
                 reply_to: str | None) -> None:
        super().__init__(subject, data, headers, delivery_count=delivered, position=sequence,
                         reply_to=reply_to)
        self._owner = owner
        self._ack_subject = ack_subject

    async def ack(self) -> None:
        await self._owner.settle(self._ack_subject, _ACK)

    async def retry_later(self, delay: float) -> bool:
        payload = _NAK + b' {"delay": %d}' % int(delay * 1e9) if delay > 0 else _NAK
        await self._owner.settle(self._ack_subject, payload)
        return True

    async def term(self) -> None:
        """Tell JetStream never to redeliver this message (not used by the bus)."""
        await self._owner.settle(self._ack_subject, b"+TERM")


class PullSubscription(BrokerSubscription):
    """One group member: pulls from a durable consumer into a bounded buffer (at most one batch
    buffered or requested) and hands messages to the bus one by one; more is requested whenever
    half a batch is free.

    Its own buffer and read task rather than a :class:`~amb_core.runtime.Pump`: how much to
    pull next depends on what is buffered and what is requested, and the read loop sends the
    next pull request as the buffer drains, without a wrapper coroutine per message.
    """

    def __init__(self, js: JetStream, stream: str, consumer: str,
                 handler: DeliveryHandler, prefetch: int) -> None:
        broker = js.broker
        self._js = js
        self._broker = broker
        self._stream = stream
        self._consumer = consumer
        self._handler = handler
        self._batch = max(broker.pull_batch, prefetch)
        self._low_water = self._batch // 2
        self._buffer: deque[tuple[str, str, dict[str, str] | None, bytes]] = deque()
        self._leases: LeaseKeeper[str] = LeaseKeeper(
            self._in_progress, renew_after=broker.ack_wait / 2,
            name=f"group member of {consumer} on {stream}",
        )
        """ack subject of every message not yet settled (buffered or running)"""
        self._wake = asyncio.Event()
        self.outstanding = 0
        self.last_activity = 0.0
        self._sub: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_subject = f"{_JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._expires_ns = int(broker.pull_expires * 1e9)
        self._inbox = ""
        self._closed = False
        self._gone = False

    @property
    def _held(self) -> LeaseKeeper[str]:
        return self._leases

    async def start(self) -> None:
        self._inbox = self._broker._conn().new_inbox()
        self._sub = await self._broker._listen(self._inbox, self._on_msg)
        self._js.pulls.add(self)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._pull()  # a message published after subscribe returns is ours to get

    def _on_msg(self, subject: str, reply: str, headers: dict[str, str] | None,
                data: bytes) -> None:
        if self._closed:
            return
        if reply:
            if self.outstanding > 0:
                self.outstanding -= 1
            self._leases.hold(reply)
            self._buffer.append((subject, reply, headers, data))
            self._wake.set()
            return
        self.last_activity = time.monotonic()
        status = headers.get(STATUS) if headers else None
        if status == "100":
            return  # heartbeat
        headers = headers or {}
        if status == "409" and "Deleted" in headers.get(DESCRIPTION, "") and not self._gone:
            self._gone = True  # each of our open pull requests says so: log it once
            logger.warning("consumer %s on %s was deleted", self._consumer, self._stream)
        # 408/409: one pull request is over, and the server says how much of it went unused.
        unused = headers.get(PENDING_MESSAGES, "")
        if unused.isdigit():
            self.outstanding = max(self.outstanding - int(unused), 0)
        else:
            self.outstanding = 0
        self._wake.set()

    def restart_pull(self) -> None:
        self.outstanding = 0
        self._wake.set()

    async def _pull(self) -> None:
        """Ask for what tops buffered + requested up to one batch. Pulls overlap: the next one
        goes out while the last is still being filled, so messages keep flowing."""
        want = self._batch - len(self._buffer) - self.outstanding
        if want <= 0:
            return
        self.outstanding += want
        self.last_activity = time.monotonic()
        payload = b'{"batch":%d,"expires":%d}' % (want, self._expires_ns)
        try:
            await self._broker._send(self._next_subject, payload, None, self._inbox)
        except Exception:
            self.outstanding = max(self.outstanding - want, 0)
            raise

    async def _read(self) -> None:
        buffer = self._buffer
        handler = self._handler
        while True:
            if self.outstanding + len(buffer) <= self._low_water:
                try:
                    await self._pull()
                except NotConnected:
                    return
                except Exception:
                    logger.debug("pull request failed; retrying", exc_info=True)
                    await asyncio.sleep(min(self._broker.reconnect.max_delay, 1.0))
                    continue
            if not buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            subject, reply, headers, data = buffer.popleft()
            tokens = reply.split(".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the
            # longer form with domain and account hash (tokens counted from the end).
            delivered, sequence = int(tokens[-5]), int(tokens[-4])
            reply_to = headers.pop(REPLY_TO, None) if headers else None
            await handler(JetStreamDelivery(self, subject, reply, data,
                                            delivered_headers(headers), delivered, sequence,
                                            reply_to))

    async def settle(self, ack_subject: str, payload: bytes) -> None:
        if not self._leases.release(ack_subject) and self._closed:
            return  # already nak'ed at close
        await self._broker._send(ack_subject, payload, None)

    async def _in_progress(self, subjects: list[str]) -> None:
        """The lease keeper's renewal: an in-progress ack per message held past ack_wait/2."""
        send = self._broker._send
        for subject in subjects:
            await send(subject, _PROGRESS, None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._js.pulls.discard(self)
        if self._sub is not None:
            await self._broker._unlisten(self._sub)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        # Whatever we held and did not settle goes back at once, for another member.
        held = self._leases.release_all()
        await self._leases.close()
        self._buffer.clear()
        nc = self._broker._nc
        if nc is None or nc.is_closed:
            return
        from amb_core.adapters.nats.broker import flush_in_order

        if held:
            # nats-server 2.9 loses the delivery count of a nak'ed message that it first
            # offers to a waiting pull request whose inbox is gone (ours, still waiting after
            # our UNSUB): the next member would see it as a first delivery. Once the UNSUB is
            # in, a consumer info request makes the server drop such requests; nak after it.
            with contextlib.suppress(Exception):
                await flush_in_order(nc, timeout=2.0)
                await nc.jetstream(timeout=2.0).consumer_info(self._stream, self._consumer)
        for subject in held:
            with contextlib.suppress(Exception):
                await nc.publish(subject, _NAK)
        with contextlib.suppress(Exception):
            await flush_in_order(nc)

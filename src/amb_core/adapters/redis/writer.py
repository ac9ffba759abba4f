"""One writer task per broker pipelines every publish and acknowledgement.

Everything queued during one event-loop turn (publishes from :meth:`RedisBroker.publish`,
``XACK`` s from group members) goes out as one pipeline on the writer's own connection, and the
one-line replies come back through the reader :mod:`._fast` picked. Acknowledgements ride on
the same pipeline as publishes, grouped per stream and group into one ``XACK`` each, so this is
also where acks are batched (an :class:`~amb_core.runtime.AckBatcher` in front would add a
``call_soon`` hop and a second buffer per ack for the same one write per turn).

The writer reconnects lazily, on the next batch, within the connect timeout: a publish while
Redis is down raises :class:`BrokerConnectionError` at once (the caller's retry loop decides),
rather than waiting in a supervisor's backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from amb_core.adapters._client import require
from amb_core.adapters.redis import _fast
from amb_core.adapters.redis.connection import ERRORS, connect, connection_errors, make
from amb_core.adapters.redis.protocol import PUBLISH_SCRIPT, pack, publish_head, wait_command
from amb_core.broker import INBOX_PREFIX
from amb_core.errors import BrokerConnectionError
from amb_core.topics import matches

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from amb_core.adapters.redis.broker import RedisBroker

logger = logging.getLogger(__name__)

MAX_BATCH = 2048
MAX_BATCH_BYTES = 4 * 1024 * 1024

Entry = tuple[bytes, "asyncio.Future[None] | None", "str | None"]
"""(packed command, future of a confirmed publish or None, topic whose reply says whether it
has a stream, or None)."""


class Writer:
    """The publish queue and the task that writes it. :meth:`RedisBroker.publish` fills
    ``queue`` directly (no call per message); group members call :meth:`ack`."""

    def __init__(self, broker: RedisBroker, conn: AbstractConnection | None,
                 read_replies: _fast.ReadReplies) -> None:
        self.broker = broker
        self.conn: AbstractConnection | None = conn
        self.wait = (wait_command(broker.durable_replicas, broker.durable_timeout)
                     if broker.durable_replicas else None)
        """``WAIT`` appended to every batch (``durable_replicas``), else None."""
        self.read_timeout = broker.socket_timeout + (
            broker.durable_timeout if broker.durable_replicas else 0.0)
        self.read_replies = read_replies
        self.queue: list[Entry] = []
        self.queued_bytes = 0
        self.acks: dict[tuple[bytes, bytes], list[bytes]] = {}
        self.wakeup: asyncio.Future[None] | None = None
        self.space: asyncio.Future[None] | None = None
        self.heads: dict[str, tuple[bytes, bytes]] = {}
        self.has_stream: dict[str, bool] = {}
        self.dropped = 0
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    # --- what publish and ack use ----------------------------------------------------------

    def head(self, topic: str) -> tuple[bytes, bytes]:
        """The cached bytes around a publish body for ``topic`` (see :func:`publish_head`)."""
        head = self.heads.get(topic)
        if head is None:
            broker = self.broker
            inbox = topic.startswith(INBOX_PREFIX)  # reply channels: pub/sub only
            force = not inbox and broker.keeps_stream(topic)
            head = publish_head(topic.encode(), broker.stream_key(topic), broker.stream_maxlen,
                                force, script=not inbox)
            if inbox:
                self.has_stream[topic] = False
            elif force:
                self.has_stream[topic] = True
            if len(self.heads) > 10_000:
                self.heads.clear()
            self.heads[topic] = head
        return head

    def forget(self, topic: str) -> None:
        """``topic`` changed kind (now kept, or its stream deleted): recompute its head."""
        self.heads.pop(topic, None)
        self.has_stream.pop(topic, None)

    def wake(self) -> None:
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def wait_for_space(self) -> None:
        """A publisher that never yields waits here for the writer (bounded memory)."""
        if self.space is None or self.space.done():
            self.space = asyncio.get_running_loop().create_future()
        await asyncio.shield(self.space)

    def ack(self, key: bytes, group: bytes, entry_id: bytes) -> None:
        """XACK, pipelined with the next batch (a lost ack is a redelivery: at-least-once)."""
        ids = self.acks.get((key, group))
        if ids is None:
            self.acks[(key, group)] = [entry_id]
        else:
            ids.append(entry_id)
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (errors go to the
        publishers, not here)."""
        while self.queue or self.acks or self._in_flight:
            if self._task.done():
                return
            self._drained.clear()
            self.wake()
            await self._drained.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
        self._fail(self.queue, BrokerConnectionError("RedisBroker closed"))
        self.queue = []
        if self.dropped:
            logger.warning("%d buffered pub/sub publish(es) were dropped on connection errors",
                           self.dropped)

    # --- the task --------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue and not self.acks:
                self._drained.set()
                self.wakeup = loop.create_future()
                await self.wakeup
                self.wakeup = None
            batch = self.queue
            self.queue = []
            self.queued_bytes = 0
            if self.acks:
                for (key, group), ids in self.acks.items():
                    batch.append((pack(b"XACK", key, group, *ids), None, None))
                self.acks = {}
            space = self.space
            if space is not None and not space.done():
                space.set_result(None)
            self._in_flight = len(batch)
            try:
                await self._send(batch)
            except Exception:  # never let the writer die: publishers would wait forever
                logger.exception("Redis writer failed on a batch of %d", len(batch))
                self._fail(batch, BrokerConnectionError("the Redis writer failed"))
            finally:
                self._in_flight = 0

    def _fail(self, batch: list[Entry], exc: BaseException) -> None:
        for _, future, _ in batch:
            if future is None:
                self.dropped += 1
            elif not future.done():
                future.set_exception(exc)

    async def _send(self, batch: list[Entry]) -> None:
        broker = self.broker
        conn = self.conn
        try:
            if conn is None or not conn.is_connected:
                conn = make(broker.pools.writer) if conn is None else conn
                await asyncio.wait_for(open_writer(conn), broker.connect_timeout)
                self.conn = conn
            wait = self.wait
            payload = b"".join([entry[0] for entry in batch])
            if wait is not None:
                payload += wait
            await conn.send_packed_command(payload, check_health=False)
            replies = await asyncio.wait_for(
                self.read_replies(conn, len(batch) + (wait is not None)), self.read_timeout)
            retry = []
            has_stream = self.has_stream
            if wait is not None:
                short = durability_error(broker, replies.pop())
                if short is not None:
                    retry = settle_short(batch, replies, has_stream, short)
                    replies = []  # settled
                    batch = []
            settle_replies(batch, replies, has_stream, retry)
        except connection_errors() as exc:
            if conn is not None:
                await conn.disconnect(nowait=True)
            dropped = sum(1 for _, future, _ in batch if future is None)
            if dropped:
                logger.warning("Redis connection lost (%s); %d unconfirmed pub/sub publish(es) "
                               "dropped", exc, dropped)
            self._fail(batch, ERRORS.translate(exc, f"publishing to {broker.masked_url}"))
            return
        if retry:  # the server lost its script cache (restart, SCRIPT FLUSH): load and resend
            await conn.send_command("SCRIPT", "LOAD", PUBLISH_SCRIPT)
            await conn.read_response()
            await self._send(retry)


def durability_error(broker: RedisBroker, acknowledged: object) -> Exception | None:
    """None when ``WAIT``'s reply says enough replicas have the batch, else the error its
    confirmed publishes get (the caller may retry: the message may be there twice)."""
    if isinstance(acknowledged, int) and acknowledged >= broker.durable_replicas:
        return None
    if isinstance(acknowledged, Exception):
        return BrokerConnectionError(f"WAIT failed on {broker.masked_url}: {acknowledged}")
    return BrokerConnectionError(
        f"only {acknowledged} of {broker.durable_replicas} replica(s) acknowledged the publish "
        f"within {broker.durable_timeout} s (durable_replicas): it is stored on the master "
        "but a failover may lose it; retrying may store it twice")


def settle_replies(batch: list[Entry], replies: list[_fast.Reply], has_stream: dict[str, bool],
                   retry: list[Entry], redirected: list[Entry] | None = None,
                   redirects: tuple[type[BaseException], ...] = ()) -> None:
    """Each pipelined reply to its publisher: the stream it learnt of, or the server's error.
    Entries the server lost its script for go to ``retry``; with ``redirected``, entries
    answered by one of ``redirects`` (a cluster's MOVED, ASK ...) go there."""
    exceptions = require("redis.exceptions", "redis")
    for entry, reply in zip(batch, replies, strict=True):
        _, future, topic = entry
        if isinstance(reply, Exception):
            if redirected is not None and isinstance(reply, redirects):
                redirected.append(entry)
            elif isinstance(reply, exceptions.NoScriptError):
                retry.append(entry)
            elif future is not None and not future.done():
                future.set_exception(reply)
            else:
                logger.error("Redis refused a pipelined command: %s", reply)
            continue
        if topic is not None:
            has_stream[topic] = reply == 1
        if future is not None and not future.done():
            future.set_result(None)


def settle_short(batch: list[Entry], replies: list[_fast.Reply], has_stream: dict[str, bool],
                 short: Exception) -> list[Entry]:
    """Settle a batch whose ``WAIT`` fell short: confirmed publishes fail with ``short`` (or
    their own error); returns the entries to resend after loading the script."""
    exceptions = require("redis.exceptions", "redis")
    retry = []
    for entry, reply in zip(batch, replies, strict=True):
        _, future, topic = entry
        if isinstance(reply, exceptions.NoScriptError):
            retry.append(entry)
            continue
        if topic is not None and not isinstance(reply, Exception):
            has_stream[topic] = reply == 1
        if future is not None and not future.done():
            future.set_exception(reply if isinstance(reply, Exception) else short)
    return retry


async def open_writer(conn: AbstractConnection) -> None:
    """Connect ``conn`` and load the publish script on it."""
    await connect(conn)
    await conn.send_command("SCRIPT", "LOAD", PUBLISH_SCRIPT)
    await conn.read_response()


def keeps_stream(topic: str, kept: set[str], stream_topics: tuple[str, ...]) -> bool:
    """Whether publishes to ``topic`` always XADD its stream."""
    return topic in kept or any(matches(p, topic) for p in stream_topics)

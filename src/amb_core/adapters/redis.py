"""RedisBroker (redis-py asyncio): pub/sub for plain subscriptions, Streams for consumer groups.

How the two Redis mechanisms are combined (docs/redis.md has the long version):

- **Publish** runs one server-side script per message: ``PUBLISH topic body`` and, when the
  topic's stream exists (a consumer group created it) or the topic matches ``stream_topics``
  (the dead-letter queue always does), ``XADD stream MAXLEN ~ stream_maxlen * data body`` in the
  same atomic step. So plain subscribers and groups of one topic both get every message, and a
  group never misses a message because a publisher did not know about it yet.
- Writes are pipelined by one writer task per broker: everything published during one event-loop
  turn goes out as one pipeline. ``await publish`` on a topic *known to have a stream* returns
  once Redis has appended the message (confirmed); on a pub/sub-only topic it returns once the
  message is queued (pub/sub is at-most-once anyway). A topic's kind is learnt from the script's
  reply; the first publish to a topic is always confirmed.
- **Plain subscribe** uses one pub/sub connection and one reader task per broker. Exact topics
  are SUBSCRIBEd, patterns PSUBSCRIBEd as globs and then filtered segment-exactly (a glob ``*``
  crosses dots, amb's ``*`` does not). Each subscription has its own bounded buffer and delivery
  task, so one slow handler never stalls the others; a subscription whose buffer is full drops
  (at-most-once, logged), like a NATS slow consumer.
- **Consumer groups** read the topic's stream with XREADGROUP on a connection of their own
  (BLOCK shorter than that connection's socket timeout), acknowledge with XACK (pipelined), and
  take over messages left pending by a dead member with XAUTOCLAIM after ``claim_idle`` seconds;
  the delivery count Redis keeps becomes :attr:`Delivery.delivery_count`.
- Messages travel as structured-mode CloudEvents JSON (Redis pub/sub has no headers), in the
  stream under the field ``data``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from amb_core.adapters._client import require
from amb_core.broker import (
    INBOX_PREFIX,
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    mask_url,
)
from amb_core.errors import BrokerConnectionError, NotConnected, UnsupportedFeature
from amb_core.runtime import Buffer
from amb_core.topics import is_wildcard, matches, validate_pattern

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection, ConnectionPool

logger = logging.getLogger(__name__)

# KEYS[1] stream key; ARGV: channel, body, maxlen ("0" = no trimming), force ("1" = always XADD).
_PUBLISH_SCRIPT = b"""\
redis.call('PUBLISH', ARGV[1], ARGV[2])
if ARGV[4] == '1' or redis.call('TYPE', KEYS[1]).ok == 'stream' then
  if ARGV[3] == '0' then
    redis.call('XADD', KEYS[1], '*', 'data', ARGV[2])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2])
  end
  return 1
end
return 0
"""
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_SCRIPT).hexdigest().encode()
_DATA = b"data"
_MAX_BATCH = 2048
_MAX_BATCH_BYTES = 4 * 1024 * 1024


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _pack(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _glob(pattern: str) -> bytes:
    """amb pattern -> PSUBSCRIBE glob: literal segments escaped, ``*``/``>`` as ``*``."""
    parts = []
    for segment in pattern.split("."):
        if segment in ("*", ">"):
            parts.append("*")
        else:
            parts.append("".join("\\" + c if c in "*?[]\\" else c for c in segment))
    return ".".join(parts).encode()


def _connection_errors() -> tuple[type[BaseException], ...]:
    exceptions = require("redis.exceptions", "redis")
    return (
        exceptions.ConnectionError,
        exceptions.TimeoutError,
        ConnectionError,
        OSError,
        TimeoutError,
        asyncio.TimeoutError,
    )


def _entry_body(fields: list[bytes] | dict[bytes, bytes]) -> bytes:
    """A stream entry's message: our ``data`` field, else (a foreign producer's entry) all of
    its fields as one JSON object, which the bus hands over as raw bytes."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    body = fields.get(_DATA)
    if body is not None:
        return body
    return orjson.dumps({
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()
    })


async def _read_lines(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """``count`` single-line RESP replies (``:1``, ``+OK``, ``-ERR ...``), read in bulk."""
    lines: list[bytes] = []
    rest = b""
    while len(lines) < count:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("Redis closed the connection")
        parts = (rest + data).split(b"\r\n")
        rest = parts.pop()
        lines.extend(parts)
    if rest or len(lines) != count:
        raise ConnectionError("unexpected data from Redis on the publishing connection")
    return lines


def _error(line: bytes) -> Exception:
    """A RESP error line as the redis-py exception it maps to (NOSCRIPT, WRONGTYPE ...)."""
    exceptions = require("redis.exceptions", "redis")
    text = line[1:].decode("utf-8", "replace")
    if line[:1] != b"-":
        text = f"unexpected reply {text!r}"
    error: Exception = (exceptions.NoScriptError if text.startswith("NOSCRIPT")
                        else exceptions.ResponseError)(text)
    return error


def _make(pool: Any) -> AbstractConnection:
    """A connection of its own from a pool's settings (not checked out of the pool)."""
    conn: AbstractConnection = pool.make_connection()
    return conn


async def _connect(conn: Any) -> None:
    await conn.connect()


async def _read_one(conn: AbstractConnection) -> Any:
    exceptions = require("redis.exceptions", "redis")
    try:
        return await conn.read_response()
    except exceptions.ResponseError as exc:
        return exc


def _stream_id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class _PlainSub(BrokerSubscription):
    """One plain subscription: a bounded buffer filled by the broker's pub/sub reader and a
    task of its own calling the handler."""

    def __init__(self, broker: RedisBroker, pattern: str, handler: DeliveryHandler) -> None:
        self.broker = broker
        self.pattern = pattern
        self.wildcard = is_wildcard(pattern)
        self.key = _glob(pattern) if self.wildcard else pattern.encode()
        self.buffer: Buffer[Delivery] = Buffer(broker.buffer_size)
        self.dropped = 0
        self._last_drop_log = 0.0
        self.task = asyncio.get_running_loop().create_task(self._run(handler))

    async def _run(self, handler: DeliveryHandler) -> None:
        buffer = self.buffer
        while True:
            delivery = await buffer.get()
            try:
                await handler(delivery)
            except Exception:  # the bus handles handler errors; this is a bus bug
                logger.exception("delivery to %s failed", self.pattern)

    def offer(self, delivery: Delivery) -> None:
        if not self.buffer.offer(delivery):
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 5.0:
                self._last_drop_log = now
                logger.warning(
                    "slow consumer on %s: its buffer of %d is full; %d pub/sub message(s) "
                    "dropped so far", self.pattern, self.broker.buffer_size, self.dropped,
                )

    async def close(self) -> None:
        await self.broker._remove_plain(self)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class _StreamDelivery(Delivery):
    __slots__ = ("_broker", "_group", "_id", "_key")

    def __init__(self, broker: RedisBroker, key: bytes, group: bytes, entry_id: bytes,
                 topic: str, body: bytes, count: int) -> None:
        super().__init__(topic, body, {}, delivery_count=count, position=entry_id.decode())
        self._broker = broker
        self._key = key
        self._group = group
        self._id = entry_id

    async def ack(self) -> None:
        """XACK, pipelined by the writer (a lost ack means a redelivery: at-least-once)."""
        self._broker._queue_ack(self._key, self._group, self._id)


class _GroupSub(BrokerSubscription):
    """One member of a consumer group: XREADGROUP on its own connection, handler inline (the
    bus's handler call returns once it has taken the message), XAUTOCLAIM now and then."""

    def __init__(self, broker: RedisBroker, topic: str, group: str, handler: DeliveryHandler,
                 prefetch: int) -> None:
        self.broker = broker
        self.topic = topic
        self.key = broker._stream_key(topic)
        self.group = group.encode()
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self.handler = handler
        self.count = max(prefetch, broker.batch_size)
        self.closing = False
        self.conn: AbstractConnection | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.broker._create_group(self.key, self.group, b"$")
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _call(self, *args: Any) -> Any:
        conn = self.conn
        if conn is None:
            conn = self.conn = _make(self.broker._pools.reader)
        await conn.send_command(*args)
        return await conn.read_response(disable_decoding=True)

    async def _run(self) -> None:
        broker = self.broker
        errors = _connection_errors()
        response_error = require("redis.exceptions", "redis").ResponseError
        claim_interval = broker.claim_idle / 2
        next_claim = 0.0
        backoff = 0.05
        read_ahead = False
        while not self.closing:
            try:
                if not read_ahead:
                    now = time.monotonic()
                    if now >= next_claim:
                        await self._claim()
                        next_claim = time.monotonic() + claim_interval
                    await self._send_read(next_claim)
                read_ahead = False
                reply = await self.conn.read_response(disable_decoding=True)  # type: ignore[union-attr]
                backoff = 0.05
                if reply:
                    entries = reply[0][1]
                    if len(entries) >= self.count and time.monotonic() < next_claim:
                        # A full batch: the stream is busy, so ask for the next one now and
                        # let Redis answer while this one is handled.
                        await self._send_read(next_claim)
                        read_ahead = True
                    await self._deliver(entries, None)
            except response_error as exc:
                read_ahead = False
                if str(exc).startswith("NOGROUP"):
                    logger.warning("group %s on %s vanished; re-creating it",
                                   self.group.decode(), self.topic)
                    await broker._create_group(self.key, self.group, b"0")
                else:
                    logger.error("XREADGROUP on %s failed: %s", self.topic, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            except errors as exc:
                read_ahead = False
                if self.conn is not None:
                    await self.conn.disconnect(nowait=True)
                logger.warning("stream reader of %s lost Redis (%s); reconnecting in %.2fs",
                               self.topic, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                logger.exception("stream reader of %s failed; retrying", self.topic)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _send_read(self, next_claim: float) -> None:
        block = min(self.broker.block_timeout, max(next_claim - time.monotonic(), 0.001))
        conn = self.conn
        if conn is None:
            conn = self.conn = _make(self.broker._pools.reader)
        await conn.send_command(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.count,
            "BLOCK", max(int(block * 1000), 1), "STREAMS", self.key, ">",
        )

    async def _claim(self) -> None:
        """Take over entries pending longer than claim_idle (their member died or gave them
        back), with the delivery count Redis kept for each."""
        cursor = b"0-0"
        min_idle = int(self.broker.claim_idle * 1000)
        while not self.closing:
            reply = await self._call("XAUTOCLAIM", self.key, self.group, self.consumer,
                                     min_idle, cursor, "COUNT", self.count)
            cursor, entries = reply[0], [e for e in reply[1] if e and e[1] is not None]
            if entries:
                ids = [e[0] for e in entries]
                pending = await self._call("XPENDING", self.key, self.group,
                                           min(ids, key=_stream_id_key),
                                           max(ids, key=_stream_id_key), len(ids) * 2,
                                           self.consumer)
                counts = {p[0]: int(p[3]) for p in pending}
                await self._deliver(entries, counts)
            if cursor == b"0-0" or not entries:
                return

    async def _deliver(self, entries: list[Any], counts: dict[bytes, int] | None) -> None:
        broker, handler = self.broker, self.handler
        fetched = time.monotonic()
        refresh_after = broker.claim_idle / 2
        keep: set[bytes] | None = None
        for index, (entry_id, fields) in enumerate(entries):
            if self.closing:
                return
            elapsed = time.monotonic() - fetched
            if elapsed > refresh_after:
                # Entries waiting in this batch for long: reset their idle time so nobody
                # claims them as orphans (unless someone already did: then they are theirs).
                rest = [e[0] for e in entries[index:]]
                claimed = await broker._pools.client.xclaim(
                    self.key, self.group, self.consumer,
                    min_idle_time=max(int((elapsed - 0.5) * 1000), 0), message_ids=rest,
                    justid=True,
                )
                keep = set(claimed)
                fetched = time.monotonic()
            if keep is not None and entry_id not in keep:
                continue
            count = counts.get(entry_id, 1) if counts is not None else 1
            await handler(_StreamDelivery(broker, self.key, self.group, entry_id, self.topic,
                                          _entry_body(fields), count))

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.conn is not None:
            await self.conn.disconnect(nowait=True)
        self.broker._group_subs.discard(self)
        await self.broker._give_back(self.key, self.group, self.consumer)


class RedisBroker(Broker):
    """Redis: pub/sub for plain subscriptions, Streams for consumer groups, replay and dead
    letters. See the module docstring and docs/redis.md.

    ``stream_maxlen`` caps each stream (approximate MAXLEN trimming; 0 = no cap).
    ``stream_topics`` are patterns whose messages always go to a stream (for replay without a
    group); the dead-letter queue is always one. ``claim_idle`` is how long (s) a group message
    may stay unacknowledged before another member takes it over; it must exceed the longest
    handler run. ``socket_timeout`` bounds every non-blocking command; blocking reads never
    exceed it (pub/sub reads have no timeout and a PING watchdog instead).
    """

    capabilities = Capabilities(
        wildcards=True,
        consumer_groups=True,
        persistent=True,
        redelivers_unacked=True,
        replay=True,
        ordering=True,
        at_least_once=True,
        headers=False,
        native_request_reply=False,
        reconnect=True,
        max_payload=None,
    )

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        dead_letter_queue: str = "dlq:agent-messages",
        *,
        stream_maxlen: int = 100_000,
        stream_topics: Iterable[str] = (),
        stream_prefix: str = "",
        claim_idle: float = 30.0,
        block_timeout: float = 10.0,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        buffer_size: int = 65_536,
        batch_size: int = 256,
        health_interval: float = 30.0,
    ) -> None:
        if stream_maxlen < 0:
            raise ValueError("stream_maxlen must be 0 (no cap) or positive")
        if claim_idle <= 0 or block_timeout <= 0 or buffer_size < 1 or batch_size < 1:
            raise ValueError("claim_idle, block_timeout, buffer_size, batch_size must be > 0")
        self.url = url
        self.dead_letter_queue = dead_letter_queue
        self.default_dead_letter_topic = dead_letter_queue
        self.stream_maxlen = stream_maxlen
        self.stream_topics = tuple(validate_pattern(p) for p in stream_topics)
        self.stream_prefix = stream_prefix
        self.claim_idle = claim_idle
        self.block_timeout = block_timeout
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.health_interval = health_interval
        self._reset()

    def _reset(self) -> None:
        self._connected = False
        self._pools: _Pools = None  # type: ignore[assignment]
        # writer
        self._queue: list[tuple[bytes, asyncio.Future[None] | None, str | None]] = []
        self._queued_bytes = 0
        self._acks: dict[tuple[bytes, bytes], list[bytes]] = {}
        self._wakeup: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._writer_conn: AbstractConnection | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._heads: dict[str, tuple[bytes, bytes]] = {}
        self._has_stream: dict[str, bool] = {}
        self._dropped = 0
        # pub/sub
        self._exact: dict[bytes, list[_PlainSub]] = {}
        self._globs: dict[bytes, list[_PlainSub]] = {}
        self._confirm: dict[tuple[bytes, bytes], asyncio.Future[None]] = {}
        self._ps_conn: AbstractConnection | None = None
        self._ps_task: asyncio.Task[None] | None = None
        self._ps_watch: asyncio.Task[None] | None = None
        self._ps_ready: asyncio.Event | None = None
        self._ps_lock = asyncio.Lock()
        self._ps_last_read = 0.0
        self._topics: dict[bytes, str] = {}
        # groups
        self._group_subs: set[_GroupSub] = set()

    def __repr__(self) -> str:
        return (f"RedisBroker(url={mask_url(self.url)!r}, "
                f"dead_letter_queue={self.dead_letter_queue!r})")

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        return cls(url=url)

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected:
            return
        self._reset()
        self._pools = _Pools(self)
        try:
            conn = _make(self._pools.writer)
            await asyncio.wait_for(self._open_writer(conn), self.connect_timeout)
        except Exception as exc:
            await self._pools.close()
            raise BrokerConnectionError(
                f"cannot connect to Redis at {mask_url(self.url)}: {exc}"
            ) from exc
        self._writer_conn = conn
        self._connected = True
        self._drained.set()
        self._writer_task = asyncio.get_running_loop().create_task(self._write_loop())

    async def _open_writer(self, conn: AbstractConnection) -> None:
        await _connect(conn)
        await conn.send_command("SCRIPT", "LOAD", _PUBLISH_SCRIPT)
        await conn.read_response()

    async def close(self) -> None:
        if not self._connected:
            return
        for group_sub in list(self._group_subs):
            await group_sub.close()
        await self._flush()
        self._connected = False
        for task in (self._writer_task, self._ps_task, self._ps_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for subs in (*self._exact.values(), *self._globs.values()):
            for sub in subs:
                sub.task.cancel()
        for conn in (self._writer_conn, self._ps_conn):
            if conn is not None:
                await conn.disconnect(nowait=True)
        await self._pools.close()
        if self._dropped:
            logger.warning("%d buffered pub/sub publish(es) were dropped on connection errors",
                           self._dropped)

    def _require(self) -> None:
        if not self._connected:
            raise NotConnected("RedisBroker is not connected")

    # --- publish: one writer task pipelines everything ----------------------------------------

    def _stream_key(self, topic: str) -> bytes:
        return (self.stream_prefix + topic).encode()

    def _head(self, topic: str) -> tuple[bytes, bytes]:
        head = self._heads.get(topic)
        if head is None:
            channel = topic.encode()
            force = topic == self.dead_letter_queue or any(
                matches(p, topic) for p in self.stream_topics
            )
            if topic.startswith(INBOX_PREFIX):  # reply channels: pub/sub only
                head = (b"*3\r\n$7\r\nPUBLISH\r\n" + _bulk(channel), b"")
                self._has_stream[topic] = False
            else:
                head = (
                    b"*8\r\n$7\r\nEVALSHA\r\n" + _bulk(_PUBLISH_SHA) + b"$1\r\n1\r\n"
                    + _bulk(self._stream_key(topic)) + _bulk(channel),
                    _bulk(str(self.stream_maxlen).encode()) + (b"$1\r\n1\r\n" if force
                                                               else b"$1\r\n0\r\n"),
                )
                if force:
                    self._has_stream[topic] = True
            if len(self._heads) > 10_000:
                self._heads.clear()
            self._heads[topic] = head
        return head

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Queue for the writer. Confirmed (returns after Redis appended it to the stream) when
        the topic is known to have a stream or is new; else returns once queued."""
        if not self._connected:
            self._require()
        head, tail = self._head(topic)
        packed = b"%b$%d\r\n%b\r\n%b" % (head, len(body), body, tail)
        confirm = self._has_stream.get(topic, True)
        future = asyncio.get_running_loop().create_future() if confirm else None
        self._queue.append((packed, future, topic if tail else None))
        self._queued_bytes += len(packed)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        if future is not None:
            await future
        elif len(self._queue) >= _MAX_BATCH or self._queued_bytes >= _MAX_BATCH_BYTES:
            # Bounded memory: a publisher that never yields waits for the writer here.
            if self._space is None or self._space.done():
                self._space = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._space)

    def _queue_ack(self, key: bytes, group: bytes, entry_id: bytes) -> None:
        ids = self._acks.get((key, group))
        if ids is None:
            self._acks[(key, group)] = [entry_id]
        else:
            ids.append(entry_id)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _flush(self) -> None:
        """Wait until everything queued so far has been written (bounded by socket_timeout
        per batch; errors are reported to the publishers, not here)."""
        while self._queue or self._acks or self._in_flight:
            if self._writer_task is None or self._writer_task.done():
                return
            self._drained.clear()
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)
            await self._drained.wait()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._acks:
                self._drained.set()
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
            batch = self._queue
            self._queue = []
            self._queued_bytes = 0
            if self._acks:
                for (key, group), ids in self._acks.items():
                    batch.append((_pack(b"XACK", key, group, *ids), None, None))
                self._acks = {}
            space = self._space
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

    def _fail(self, batch: list[tuple[bytes, asyncio.Future[None] | None, str | None]],
              exc: BaseException) -> None:
        for _, future, _ in batch:
            if future is None:
                self._dropped += 1
            elif not future.done():
                future.set_exception(exc)

    async def _send(
        self, batch: list[tuple[bytes, asyncio.Future[None] | None, str | None]]
    ) -> None:
        exceptions = require("redis.exceptions", "redis")
        conn = self._writer_conn
        try:
            if conn is None or not conn.is_connected:
                conn = _make(self._pools.writer) if conn is None else conn
                await asyncio.wait_for(self._open_writer(conn), self.connect_timeout)
                self._writer_conn = conn
            await conn.send_packed_command(b"".join([entry[0] for entry in batch]),
                                           check_health=False)
            retry = []
            reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
            if reader is not None:
                # Every reply here is one line (integer or error): read them in bulk, far
                # cheaper than one read_response() per reply.
                lines = await asyncio.wait_for(_read_lines(reader, len(batch)),
                                               self.socket_timeout)
                replies: Iterable[Any] = (
                    int(line[1:]) if line[:1] == b":" else _error(line) for line in lines
                )
            else:  # pragma: no cover - a redis-py without the stream reader we expect
                replies = [await _read_one(conn) for _ in batch]
            for entry, reply in zip(batch, replies, strict=True):
                _, future, topic = entry
                if isinstance(reply, exceptions.ResponseError):
                    if isinstance(reply, exceptions.NoScriptError):
                        retry.append(entry)
                    elif future is not None and not future.done():
                        future.set_exception(reply)
                    else:
                        logger.error("Redis refused a pipelined command: %s", reply)
                    continue
                if topic is not None:
                    self._has_stream[topic] = reply == 1
                if future is not None and not future.done():
                    future.set_result(None)
        except _connection_errors() as exc:
            if conn is not None:
                await conn.disconnect(nowait=True)
            dropped = sum(1 for _, future, _ in batch if future is None)
            if dropped:
                logger.warning("Redis connection lost (%s); %d unconfirmed pub/sub publish(es) "
                               "dropped", exc, dropped)
            self._fail(batch, BrokerConnectionError(
                f"Redis at {mask_url(self.url)} unreachable: {exc}"))
            return
        if retry:  # the server lost its script cache (restart, SCRIPT FLUSH): load and resend
            await conn.send_command("SCRIPT", "LOAD", _PUBLISH_SCRIPT)
            await conn.read_response()
            await self._send(retry)

    async def _command(self, *args: Any) -> Any:
        """A one-off command on the shared pool (bounded by socket_timeout)."""
        return await self._pools.client.execute_command(*args)

    # --- plain subscriptions: one pub/sub connection, one reader -------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        self._require()
        if group is not None:
            if is_wildcard(pattern):
                raise UnsupportedFeature(
                    "RedisBroker: a consumer group reads one topic's stream; wildcard patterns "
                    "work for plain subscriptions only"
                )
            group_sub = _GroupSub(self, pattern, group, handler, prefetch)
            await group_sub.start()
            self._has_stream[pattern] = True
            self._group_subs.add(group_sub)
            return group_sub
        sub = _PlainSub(self, pattern, handler)
        table = self._globs if sub.wildcard else self._exact
        subs = table.get(sub.key)
        if subs is not None:
            subs.append(sub)
            confirmation = self._confirm.get((b"p" if sub.wildcard else b"", sub.key))
        else:
            table[sub.key] = [sub]
            confirmation = asyncio.get_running_loop().create_future()
            self._confirm[(b"p" if sub.wildcard else b"", sub.key)] = confirmation
            ready = self._ensure_pubsub()
            try:
                await asyncio.wait_for(ready.wait(), self.connect_timeout * 2)
                # Sent even if a (re)connect just subscribed everything: a second SUBSCRIBE
                # of a channel is harmless, a missing one is not.
                conn = self._ps_conn
                if conn is not None:
                    command = "PSUBSCRIBE" if sub.wildcard else "SUBSCRIBE"
                    with contextlib.suppress(*_connection_errors()):
                        await conn.send_command(command, sub.key)
            except asyncio.TimeoutError:
                pass  # reported below
        if confirmation is not None and not confirmation.done():
            try:
                await asyncio.wait_for(asyncio.shield(confirmation), self.connect_timeout * 2)
            except asyncio.TimeoutError as exc:
                await sub.close()
                raise BrokerConnectionError(
                    f"Redis at {mask_url(self.url)} did not confirm the subscription to "
                    f"{pattern!r}"
                ) from exc
        return sub

    async def _remove_plain(self, sub: _PlainSub) -> None:
        table = self._globs if sub.wildcard else self._exact
        subs = table.get(sub.key)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        if subs:
            return
        del table[sub.key]
        self._confirm.pop((b"p" if sub.wildcard else b"", sub.key), None)
        if self._ps_conn is not None and self._ps_conn.is_connected and self._connected:
            command = "PUNSUBSCRIBE" if sub.wildcard else "UNSUBSCRIBE"
            with contextlib.suppress(*_connection_errors()):
                await self._ps_conn.send_command(command, sub.key)

    def _ensure_pubsub(self) -> asyncio.Event:
        if self._ps_ready is None:
            self._ps_ready = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._ps_task = loop.create_task(self._ps_loop())
            self._ps_watch = loop.create_task(self._ps_watchdog())
        return self._ps_ready

    async def _ps_loop(self) -> None:
        errors = _connection_errors()
        backoff = 0.05
        assert self._ps_ready is not None
        while self._connected:
            conn = self._ps_conn
            try:
                if conn is None or not conn.is_connected:
                    self._ps_ready.clear()
                    conn = self._ps_conn = _make(self._pools.reader)
                    await asyncio.wait_for(_connect(conn), self.connect_timeout)
                    # (Re)subscribe everything this broker's subscriptions need, in one go.
                    if self._exact:
                        await conn.send_command("SUBSCRIBE", *self._exact)
                    if self._globs:
                        await conn.send_command("PSUBSCRIBE", *self._globs)
                    self._ps_ready.set()
                    if backoff > 0.05:
                        logger.info("pub/sub reconnected to Redis; %d subscription(s) restored",
                                    len(self._exact) + len(self._globs))
                    backoff = 0.05
                await self._ps_read(conn)
            except errors as exc:
                self._ps_ready.clear()
                if conn is not None:
                    await conn.disconnect(nowait=True)
                logger.warning("pub/sub connection to Redis lost (%s); reconnecting in %.2fs",
                               exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _ps_read(self, conn: AbstractConnection) -> None:
        exact, globs, topics = self._exact, self._globs, self._topics
        read = conn.read_response
        while True:
            reply = await read(disable_decoding=True, timeout=math.inf)
            self._ps_last_read = time.monotonic()
            kind = reply[0]
            if kind == b"message":
                subs = exact.get(reply[1])
                if subs:
                    topic = subs[0].pattern
                    body = reply[2]
                    for sub in subs:
                        sub.offer(Delivery(topic, body, {}))
            elif kind == b"pmessage":
                subs = globs.get(reply[1])
                if subs:
                    channel = reply[2]
                    topic = topics.get(channel)  # type: ignore[assignment]
                    if topic is None:
                        topic = channel.decode("utf-8", "replace")
                        if len(topics) > 10_000:
                            topics.clear()
                        topics[channel] = topic
                    body = reply[3]
                    for sub in subs:
                        if matches(sub.pattern, topic):
                            sub.offer(Delivery(topic, body, {}))
            elif kind in (b"subscribe", b"psubscribe"):
                future = self._confirm.get((b"p" if kind == b"psubscribe" else b"", reply[1]))
                if future is not None and not future.done():
                    future.set_result(None)

    async def _ps_watchdog(self) -> None:
        """A PING when the pub/sub connection has been silent for health_interval; no answer
        within another interval means a dead connection (the reader then reconnects)."""
        while self._connected:
            await asyncio.sleep(self.health_interval)
            conn = self._ps_conn
            if conn is None or not conn.is_connected or self._ps_ready is None:
                continue
            if time.monotonic() - self._ps_last_read < self.health_interval:
                continue
            pinged = time.monotonic()
            with contextlib.suppress(*_connection_errors()):
                await conn.send_command("PING")
            await asyncio.sleep(min(self.health_interval, self.socket_timeout))
            if self._ps_last_read < pinged and conn is self._ps_conn:
                logger.warning("pub/sub connection silent after PING; reconnecting")
                await conn.disconnect(nowait=True)

    # --- consumer groups ---------------------------------------------------------------------

    async def _create_group(self, key: bytes, group: bytes, start: bytes) -> None:
        exceptions = require("redis.exceptions", "redis")
        try:
            await self._command("XGROUP", "CREATE", key, group, start, "MKSTREAM")
        except exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _give_back(self, key: bytes, group: bytes, consumer: bytes) -> None:
        """On close: make this member's unacknowledged entries claimable by the others at
        once (idle time set past claim_idle), or drop the member if it holds none."""
        if not self._connected:
            return
        await self._flush()  # pending acks first
        try:
            client = self._pools.client
            pending = await client.xpending_range(key, group, min="-", max="+", count=10_000,
                                                  consumername=consumer)
            if not pending:
                await client.xgroup_delconsumer(key, group, consumer)
                return
            await client.xclaim(key, group, consumer, min_idle_time=0,
                                message_ids=[p["message_id"] for p in pending],
                                idle=int(self.claim_idle * 1000) + 1000, justid=True)
        except (*_connection_errors(), require("redis.exceptions", "redis").ResponseError) as exc:
            logger.info("could not hand back pending entries of %s: %s", key.decode(), exc)

    async def delete_stream(self, topic: str) -> None:
        """Delete a topic's stream with its groups and messages (tests, benchmarks, cleanup)."""
        self._require()
        await self._command("DEL", self._stream_key(topic))
        self._has_stream.pop(topic, None)

    # --- replay ------------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        """XRANGE over the topic's stream (or, for a pattern, every matching stream, merged in
        id order). ``since``: a stream id (``"1700000000000-0"``, inclusive), an int of
        milliseconds since the epoch, or a datetime (the server's append time)."""
        self._require()
        exceptions = require("redis.exceptions", "redis")
        if since is None:
            start = b"-"
        elif isinstance(since, datetime):
            start = b"%d-0" % math.floor(since.timestamp() * 1000)
        elif isinstance(since, int):
            start = b"%d-0" % since
        else:
            start = since.encode()
        if is_wildcard(topic):
            prefix = self.stream_prefix.encode()
            keys: list[tuple[bytes, str]] = []
            async for key in self._pools.client.scan_iter(match=prefix + _glob(topic),
                                                          _type="STREAM", count=1000):
                name = key[len(prefix):].decode("utf-8", "replace")
                if matches(topic, name):
                    keys.append((key, name))
        else:
            keys = [(self._stream_key(topic), topic)]
        entries: list[tuple[tuple[int, int], bytes, str, bytes]] = []
        for key, name in keys:
            cursor = start
            while True:
                try:
                    page = await self._command("XRANGE", key, cursor, "+", "COUNT", 1000)
                except exceptions.ResponseError as exc:
                    raise ValueError(f"invalid replay position {since!r}: {exc}") from exc
                for entry_id, fields in page:
                    entries.append((_stream_id_key(entry_id), entry_id, name,
                                    _entry_body(fields)))
                if len(page) < 1000:
                    break
                cursor = b"(" + page[-1][0]
        if len(keys) > 1:
            entries.sort(key=lambda e: e[0])
        for _, entry_id, name, body in entries:
            yield Delivery(name, body, {}, position=entry_id.decode())


class _Pools:
    """Connection factories from the URL: ``writer`` and ``client`` with socket_timeout, and
    ``reader`` for blocking reads (no socket timeout on pub/sub; group readers' BLOCK is
    bounded by block_timeout and the read by block_timeout + socket_timeout)."""

    def __init__(self, broker: RedisBroker) -> None:
        redis = require("redis.asyncio", "redis")
        common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": broker.connect_timeout,
            "socket_keepalive": True,
            "protocol": 2,
        }
        self.writer: ConnectionPool = redis.ConnectionPool.from_url(
            broker.url, socket_timeout=broker.socket_timeout, **common)
        self.reader: ConnectionPool = redis.ConnectionPool.from_url(
            broker.url, socket_timeout=broker.block_timeout + broker.socket_timeout, **common)
        self.client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
            broker.url, socket_timeout=broker.socket_timeout, **common))

    async def close(self) -> None:
        await self.client.aclose()
        await self.writer.disconnect()
        await self.reader.disconnect()


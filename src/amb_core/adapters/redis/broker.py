"""RedisBroker: the options, the lifecycle, publish, and what is kept in Streams (groups,
replay, dead letters). The moving parts live next to it: :mod:`.writer` (the pipelined
publish/ack writer), :mod:`.pubsub` (plain subscriptions), :mod:`.groups` (consumer groups),
:mod:`._fast` (redis-py internals, version-gated); docs/redis.md has the long version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from amb_core.adapters._client import require
from amb_core.adapters.redis import _fast
from amb_core.adapters.redis.cluster import ClusterWriter, Topology, is_cluster
from amb_core.adapters.redis.connection import ERRORS, Pools, connection_errors, make
from amb_core.adapters.redis.groups import GroupMember
from amb_core.adapters.redis.protocol import entry_body, glob, stream_id_key
from amb_core.adapters.redis.pubsub import PubSub
from amb_core.adapters.redis.writer import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    Writer,
    keeps_stream,
    open_writer,
)
from amb_core.broker import (
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    mask_url,
)
from amb_core.errors import BrokerConnectionError, NotConnected, UnsupportedFeature
from amb_core.runtime import ReconnectPolicy
from amb_core.topics import is_wildcard, matches, validate_pattern, validate_topic

logger = logging.getLogger(__name__)

KEPT_REGISTRY = "amb:dead-letter-topics"
"""A Redis set (under ``stream_prefix``) of the topics kept as dead-letter destinations, so a
broker in another process that creates a group on one later starts it at the oldest letter."""

# KEYS[1] the stream. An empty stream is made (an entry added and trimmed at once) so that
# every publisher's script appends to it from now on.
_KEEP_SCRIPT = """\
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'amb', 'keep')
end
return 1
"""

_PAGE = 1000


class RedisBroker(Broker):
    """Redis: pub/sub for plain subscriptions, Streams for consumer groups, replay and dead
    letters. See docs/redis.md.

    ``stream_maxlen`` caps each stream (approximate MAXLEN trimming; 0 = no cap).
    ``stream_topics`` are patterns whose messages always go to a stream (for replay without a
    group); dead-letter destinations always are one. ``claim_idle`` is how long (s) a group
    message may stay unacknowledged, with nobody renewing it, before another member takes it
    over (a member renews what it holds every ``claim_idle / 2``). ``socket_timeout`` bounds
    every non-blocking command; blocking reads never exceed it (pub/sub reads have no timeout
    and a PING watchdog instead). ``reconnect`` is the backoff of the pub/sub connection and
    the group readers; ``connect_timeout``, when given, overrides its ``connect_timeout``.
    ``fast_path=False`` reads replies with redis-py's public API only (see :mod:`._fast`).

    ``cluster``: ``None`` (default) asks the URL's node at connect (``INFO cluster``) and
    speaks Redis Cluster when it is one (any node's URL works); ``True`` insists (connect fails
    on a single node), ``False`` never (a cluster then answers ``MOVED``). :attr:`clustered`
    says what was chosen. ``durable_replicas=N`` makes a confirmed publish wait (``WAIT N``,
    at most ``durable_timeout`` s) until N replicas have it, and fail with
    :class:`BrokerConnectionError` when fewer did; 0 (default) confirms once the master has it,
    which a failover can lose (docs/redis.md, "Redis Cluster").
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
        connect_timeout: float | None = None,
        reconnect: ReconnectPolicy | None = None,
        buffer_size: int = 65_536,
        batch_size: int = 256,
        health_interval: float = 30.0,
        fast_path: bool = True,
        cluster: bool | None = None,
        durable_replicas: int = 0,
        durable_timeout: float = 1.0,
    ) -> None:
        if stream_maxlen < 0:
            raise ValueError("stream_maxlen must be 0 (no cap) or positive")
        if claim_idle <= 0 or block_timeout <= 0 or buffer_size < 1 or batch_size < 1:
            raise ValueError("claim_idle, block_timeout, buffer_size, batch_size must be > 0")
        if durable_replicas < 0 or durable_timeout <= 0:
            raise ValueError("durable_replicas must be >= 0 and durable_timeout > 0")
        policy = reconnect or ReconnectPolicy()
        if connect_timeout is not None:
            policy = dataclasses.replace(policy, connect_timeout=connect_timeout)
        self.url = url
        self.masked_url = mask_url(url)
        self.dead_letter_queue = dead_letter_queue
        self.default_dead_letter_topic = dead_letter_queue
        self.stream_maxlen = stream_maxlen
        self.stream_topics = tuple(validate_pattern(p) for p in stream_topics)
        self.stream_prefix = stream_prefix
        self.claim_idle = claim_idle
        self.block_timeout = block_timeout
        self.socket_timeout = socket_timeout
        self.reconnect = policy
        self.connect_timeout = policy.connect_timeout
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.health_interval = health_interval
        self.fast_path = fast_path
        self.cluster = cluster
        self.durable_replicas = durable_replicas
        self.durable_timeout = durable_timeout
        self.clustered = False
        """Whether the last connect chose Redis Cluster mode."""
        self.topology: Topology | None = None
        self.reply_reader = "none"
        """Which reply reader the publishing connection uses: "bulk" or "public"."""
        self.connection_errors: tuple[type[BaseException], ...] = ()
        self._kept: set[str] = {dead_letter_queue}
        self._reset()

    def _reset(self) -> None:
        self.pools: Pools = None  # type: ignore[assignment]
        self.writer: Writer | None = None
        self.pubsub: PubSub | None = None
        self._members: set[GroupMember] = set()
        self._closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisBroker(url={self.masked_url!r}, dead_letter_queue={self.dead_letter_queue!r})"

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        return cls(url=url)

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self.writer is not None:
            return
        self._reset()
        self.connection_errors = connection_errors()
        read_replies, self.reply_reader = _fast.select(self.fast_path)
        self.pools = Pools(self.url, connect_timeout=self.connect_timeout,
                           socket_timeout=self.socket_timeout, block_timeout=self.block_timeout)
        conn = make(self.pools.writer)
        try:
            await asyncio.wait_for(open_writer(conn), self.connect_timeout)
            clustered = self.cluster
            if clustered is None:
                clustered = await asyncio.wait_for(is_cluster(conn), self.connect_timeout)
            if clustered:
                await asyncio.wait_for(self.pools.use_cluster(), self.connect_timeout * 2)
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            await self.pools.close()
            self.pools = None  # type: ignore[assignment]
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise BrokerConnectionError(
                f"cannot connect to Redis at {self.masked_url}: {exc}") from exc
        self.clustered = bool(clustered)
        if clustered:
            await conn.disconnect(nowait=True)
            self.topology = Topology(self.pools)
            self.writer = ClusterWriter(self, self.topology, read_replies)
        else:
            self.topology = None
            self.writer = Writer(self, conn, read_replies)
        self.pubsub = PubSub(self)

    async def close(self) -> None:
        """Hand back what group members hold, flush the writer, disconnect. Safe to call
        twice and concurrently (later callers wait for the first)."""
        task = self._closing
        if task is None:
            if self.writer is None:
                return
            task = self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(task)

    async def _close(self) -> None:
        for member in list(self._members):
            await member.close()
        writer, self.writer = self.writer, None  # publishes from now on: NotConnected
        assert writer is not None
        await writer.flush()
        if self.pubsub is not None:
            await self.pubsub.close()
        await writer.close()
        await self.pools.close()

    def _require(self) -> Writer:
        writer = self.writer
        if writer is None:
            raise NotConnected("RedisBroker is not connected")
        return writer

    # --- publish -----------------------------------------------------------------------------

    def stream_key(self, topic: str) -> bytes:
        return (self.stream_prefix + topic).encode()

    def keeps_stream(self, topic: str) -> bool:
        """Publishes to ``topic`` always XADD its stream (kept dead letters, stream_topics)."""
        return keeps_stream(topic, self._kept, self.stream_topics)

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Queue for the writer. Confirmed (returns after Redis appended it to the stream) when
        the topic is known to have a stream or is new; else returns once queued."""
        writer = self.writer
        if writer is None:
            raise NotConnected("RedisBroker is not connected")
        head = writer.heads.get(topic)
        if head is None:
            head = writer.head(topic)
        prefix, tail = head
        packed = b"%b$%d\r\n%b\r\n%b" % (prefix, len(body), body, tail)
        future = (asyncio.get_running_loop().create_future()
                  if writer.has_stream.get(topic, True) else None)
        queue = writer.queue
        queue.append((packed, future, topic if tail else None))
        writer.queued_bytes += len(packed)
        wakeup = writer.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        if future is not None:
            await future
        elif len(queue) >= MAX_BATCH or writer.queued_bytes >= MAX_BATCH_BYTES:
            await writer.wait_for_space()

    async def _command(self, *args: Any) -> Any:
        """A one-off command on the shared pool (bounded by socket_timeout)."""
        with ERRORS.mapped(f"{args[0]} on {self.masked_url}"):
            return await self.pools.client.execute_command(*args)

    # --- subscribe ---------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        writer = self._require()
        if group is None:
            assert self.pubsub is not None
            return await self.pubsub.add(pattern, handler)
        if is_wildcard(pattern):
            raise UnsupportedFeature(
                "RedisBroker: a consumer group reads one topic's stream; wildcard patterns "
                "work for plain subscriptions only"
            )
        member = GroupMember(self, pattern, group, handler, prefetch)
        await member.start()
        writer.has_stream[pattern] = True
        self._members.add(member)
        return member

    def forget_member(self, member: GroupMember) -> None:
        self._members.discard(member)

    async def _is_kept(self, topic: str) -> bool:
        if topic in self._kept:
            return True
        registry = self.stream_prefix + KEPT_REGISTRY
        return bool(await self._command("SISMEMBER", registry, topic))

    async def create_group(self, topic: str, group: bytes, start: bytes | None = None) -> None:
        """XGROUP CREATE ... MKSTREAM (nothing if it exists). A new group starts at ``$``
        (what is published from now on), on a kept dead-letter topic at ``0`` (every letter
        still kept)."""
        if start is None:
            start = b"0" if await self._is_kept(topic) else b"$"
        exceptions = require("redis.exceptions", "redis")
        try:
            await self._command("XGROUP", "CREATE", self.stream_key(topic), group, start,
                                "MKSTREAM")
        except exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def give_back(self, key: bytes, group: bytes, consumer: bytes) -> None:
        """On a member's close: make its unacknowledged entries claimable by the others at
        once (idle time set past claim_idle), or drop the member if it holds none."""
        writer = self.writer
        if writer is None:
            return
        await writer.flush()  # pending acks first
        try:
            client = self.pools.client
            pending = await client.xpending_range(key, group, min="-", max="+", count=10_000,
                                                  consumername=consumer)
            if not pending:
                await client.xgroup_delconsumer(key, group, consumer)
                return
            await client.xclaim(key, group, consumer, min_idle_time=0,
                                message_ids=[p["message_id"] for p in pending],
                                idle=int(self.claim_idle * 1000) + 1000, justid=True)
        except (*self.connection_errors, require("redis.exceptions", "redis").ResponseError) as exc:
            logger.info("could not hand back pending entries of %s: %s", key.decode(), exc)

    async def delete_group(self, pattern: str, group: str) -> None:
        """XGROUP DESTROY on the topic's stream: the group, its members and its pending
        entries go; the stream stays (:meth:`delete_stream` removes it). This broker's own
        members of the group stop first; members in other processes should be stopped too,
        or they re-create the group on their next read."""
        self._require()
        if is_wildcard(pattern):
            raise UnsupportedFeature(
                "RedisBroker: consumer groups are on exact topics (one stream each); "
                f"{pattern!r} is a pattern"
            )
        validate_topic(pattern)
        name = group.encode()
        for member in [m for m in self._members if m.topic == pattern and m.group == name]:
            await member.close()
        exceptions = require("redis.exceptions", "redis")
        try:
            await self._command("XGROUP", "DESTROY", self.stream_key(pattern), group)
        except exceptions.ResponseError as exc:
            if "requires the key to exist" not in str(exc):
                raise

    async def delete_stream(self, topic: str) -> None:
        """Delete a topic's stream with its groups and messages (tests, benchmarks, cleanup)."""
        writer = self._require()
        await self._command("DEL", self.stream_key(topic))
        writer.forget(topic)

    # --- dead letters ------------------------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        """From now on every publish to ``topic`` appends to its stream (the stream is made
        now, so publishers in other processes append too), and a group created on it later,
        here or in another process, starts at the oldest letter kept."""
        writer = self._require()
        validate_topic(topic)
        if topic not in self._kept:
            self._kept.add(topic)
            writer.forget(topic)
        # Two commands, not one script: on a Redis Cluster the two keys live on two nodes.
        await self._command("EVAL", _KEEP_SCRIPT, 1, self.stream_key(topic))
        await self._command("SADD", self.stream_prefix + KEPT_REGISTRY, topic)

    async def dead_letters(self, topic: str) -> AsyncIterator[Delivery]:
        """XRANGE of ``topic``'s stream, oldest first; ``position`` is the entry id."""
        self._require()
        async for entry_id, fields in self._range(self.stream_key(topic), b"-"):
            yield Delivery(topic, entry_body(fields), {}, position=entry_id.decode())

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        """XDEL of the entries at ``positions`` (stream ids); returns how many went."""
        self._require()
        if not positions:
            return 0
        removed = await self._command("XDEL", self.stream_key(topic),
                                      *(str(p) for p in positions))
        return int(removed)

    async def _range(self, key: bytes, start: bytes) -> AsyncIterator[tuple[bytes, Any]]:
        """Every entry of a stream from ``start`` (inclusive), in pages."""
        cursor = start
        while True:
            page = await self._command("XRANGE", key, cursor, "+", "COUNT", _PAGE)
            for entry in page:
                yield entry
            if len(page) < _PAGE:
                return
            cursor = b"(" + page[-1][0]

    # --- replay ------------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        """XRANGE over the topic's stream (or, for a pattern, every matching stream, merged in
        id order). ``since``: a stream id (``"1700000000000-0"``, inclusive), an int of
        milliseconds since the epoch, or a datetime (the server's append time).

        A topic without a stream replays nothing, with a WARNING saying why: Redis keeps only
        topics that have a consumer group or match ``stream_topics``."""
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
            async for key in self.pools.client.scan_iter(match=prefix + glob(topic),
                                                         _type="STREAM", count=1000):
                name = key[len(prefix):].decode("utf-8", "replace")
                if matches(topic, name):
                    keys.append((key, name))
            if not keys:
                self._nothing_kept(topic, "no stream matches it")
        else:
            keys = [(self.stream_key(topic), topic)]
        entries: list[tuple[tuple[int, int], bytes, str, bytes]] = []
        for key, name in keys:
            try:
                async for entry_id, fields in self._range(key, start):
                    entries.append((stream_id_key(entry_id), entry_id, name,
                                    entry_body(fields)))
            except exceptions.ResponseError as exc:
                raise ValueError(f"invalid replay position {since!r}: {exc}") from exc
        if not entries and not is_wildcard(topic) and not await self._command("EXISTS", keys[0][0]):
            self._nothing_kept(topic, f"it has no stream ({keys[0][0].decode()!r})")
        if len(keys) > 1:
            entries.sort(key=lambda e: e[0])
        for _, entry_id, name, body in entries:
            yield Delivery(name, body, {}, position=entry_id.decode())

    def _nothing_kept(self, topic: str, why: str) -> None:
        logger.warning(
            "replay of %r returns nothing: %s. Redis keeps a topic's messages only in its "
            "stream, which exists once a consumer group subscribes to the topic or when the "
            "topic matches RedisBroker(stream_topics=[...]) (now %s); plain pub/sub messages "
            "are not stored", topic, why, list(self.stream_topics) or "empty",
        )

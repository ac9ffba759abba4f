"""Plain subscriptions: one pub/sub connection and one reader per broker, a pump each.

Exact topics are SUBSCRIBEd, patterns PSUBSCRIBEd as globs and filtered segment-exactly (a
glob ``*`` crosses dots, amb's ``*`` does not). Each subscription has its own
:class:`~amb_core.runtime.Pump`, so one slow handler never stalls the others; a full pump drops
(``offer``: Redis pushes regardless and pub/sub is at-most-once) with the runtime's one
slow-consumer report. The connection is kept up by a :class:`~amb_core.runtime.Supervisor`,
opened on the first plain subscription (:class:`~amb_core.runtime.OnDemand`); every (re)open
subscribes everything at once.

On a Redis Cluster the connection goes to any node (``PUBLISH`` is broadcast to all of them,
so ``SUBSCRIBE`` and ``PSUBSCRIBE`` see every publish), except for reply inboxes: only their
own bus reads them and no pattern is meant to match them, so they are sharded channels
(``SSUBSCRIBE`` on a connection of their own to the channel's shard, one
:class:`ShardedChannel` each, answered with ``SPUBLISH`` by :class:`~.cluster.ClusterWriter`):
a reply crosses only its shard, not the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from amb_core.adapters.redis.cluster import open_node
from amb_core.adapters.redis.connection import connect, connection_errors, make
from amb_core.adapters.redis.protocol import glob
from amb_core.broker import INBOX_PREFIX, BrokerSubscription, Delivery, DeliveryHandler
from amb_core.errors import BrokerConnectionError
from amb_core.runtime import OnDemand, Pump, Supervisor
from amb_core.topics import is_wildcard, matches

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from amb_core.adapters.redis.broker import RedisBroker

logger = logging.getLogger(__name__)


class PlainSubscription(BrokerSubscription):
    """One plain subscription: the pub/sub reader offers to its pump, the pump calls the
    handler in order."""

    __slots__ = ("key", "offer", "pattern", "pubsub", "pump", "wildcard")

    def __init__(self, pubsub: PubSub, pattern: str, handler: DeliveryHandler) -> None:
        self.pubsub = pubsub
        self.pattern = pattern
        self.wildcard = is_wildcard(pattern)
        self.key = glob(pattern) if self.wildcard else pattern.encode()
        self.pump: Pump[Delivery] = Pump(
            handler, max_items=pubsub.broker.buffer_size, name=f"Redis subscription {pattern!r}",
            hint="raise RedisBroker(buffer_size=...) or speed up the handler",
        )
        self.offer = self.pump.offer

    @property
    def dropped(self) -> int:
        return self.pump.dropped

    async def close(self) -> None:
        await self.pubsub.remove(self)
        await self.pump.close()


class PubSub:
    """The broker's pub/sub connection, its subscription tables and its reader."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.exact: dict[bytes, list[PlainSubscription]] = {}
        self.globs: dict[bytes, list[PlainSubscription]] = {}
        self.confirm: dict[tuple[bytes, bytes], asyncio.Future[None]] = {}
        self.topics: dict[bytes, str] = {}
        self.sharded: dict[bytes, ShardedChannel] = {}
        self.conn: AbstractConnection | None = None
        self.last_read = 0.0
        self.supervisor = Supervisor(
            f"Redis pub/sub at {broker.masked_url}", open=self._open, until_lost=self._read,
            discard=self._discard, policy=broker.reconnect, errors=(Exception,),
        )
        self.started: OnDemand[Supervisor] = OnDemand(self._start)
        self._watchdog: asyncio.Task[None] | None = None

    # --- the connection --------------------------------------------------------------------

    async def _start(self) -> Supervisor:
        await self.supervisor.start()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self.supervisor

    async def _open(self) -> None:
        topology = self.broker.topology
        if topology is None:
            conn = self.conn = make(self.broker.pools.reader)
            await connect(conn)
        else:  # Redis Cluster: any node (PUBLISH is broadcast to all), another on each reopen
            conn = self.conn = await open_node(topology, topology.any_node())
        # Subscribe everything this broker's subscriptions need, in one go.
        if self.exact:
            await conn.send_command("SUBSCRIBE", *self.exact)
        if self.globs:
            await conn.send_command("PSUBSCRIBE", *self.globs)
        self.last_read = time.monotonic()

    async def _discard(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _read(self) -> None:
        """Until the connection is lost (then the supervisor reconnects with backoff)."""
        try:
            await self._read_loop()
        except Exception as exc:
            if not isinstance(exc, self.broker.connection_errors):
                logger.exception("the pub/sub reader failed; reconnecting")
            raise

    async def _read_loop(self) -> None:
        conn = self.conn
        assert conn is not None
        exact, globs, topics = self.exact, self.globs, self.topics
        read = conn.read_response
        while True:
            reply = await read(disable_decoding=True, timeout=math.inf)
            self.last_read = time.monotonic()
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
                future = self.confirm.get((b"p" if kind == b"psubscribe" else b"", reply[1]))
                if future is not None and not future.done():
                    future.set_result(None)

    async def _watch(self) -> None:
        """A PING when the pub/sub connection has been silent for health_interval; no answer
        within another interval means a dead connection (the supervisor then reconnects)."""
        broker = self.broker
        while True:
            await asyncio.sleep(broker.health_interval)
            conn = self.conn
            if conn is None or not conn.is_connected or not self.supervisor.ready.is_set():
                continue
            if time.monotonic() - self.last_read < broker.health_interval:
                continue
            pinged = time.monotonic()
            with contextlib.suppress(*connection_errors()):
                await conn.send_command("PING")
            await asyncio.sleep(min(broker.health_interval, broker.socket_timeout))
            if self.last_read < pinged and conn is self.conn:
                logger.warning("pub/sub connection silent after PING; reconnecting")
                await conn.disconnect(nowait=True)

    # --- subscriptions ---------------------------------------------------------------------

    async def add(self, pattern: str, handler: DeliveryHandler) -> PlainSubscription:
        broker = self.broker
        sub = PlainSubscription(self, pattern, handler)
        if broker.topology is not None and pattern.startswith(INBOX_PREFIX):
            await self._add_sharded(sub)
            return sub
        table = self.globs if sub.wildcard else self.exact
        confirm_key = (b"p" if sub.wildcard else b"", sub.key)
        subs = table.get(sub.key)
        try:
            if subs is not None:
                subs.append(sub)
                confirmation = self.confirm.get(confirm_key)
            else:
                table[sub.key] = [sub]
                confirmation = asyncio.get_running_loop().create_future()
                self.confirm[confirm_key] = confirmation
                supervisor = await self.started.get()
                await supervisor.wait_ready(broker.connect_timeout * 2)
                # Sent even if a (re)connect just subscribed everything: a second SUBSCRIBE
                # of a channel is harmless, a missing one is not.
                conn = self.conn
                if conn is not None:
                    command = "PSUBSCRIBE" if sub.wildcard else "SUBSCRIBE"
                    with contextlib.suppress(*connection_errors()):
                        await conn.send_command(command, sub.key)
            if confirmation is not None and not confirmation.done():
                try:
                    await asyncio.wait_for(asyncio.shield(confirmation),
                                           broker.connect_timeout * 2)
                except asyncio.TimeoutError as exc:
                    raise BrokerConnectionError(
                        f"Redis at {broker.masked_url} did not confirm the subscription to "
                        f"{pattern!r}"
                    ) from exc
        except BaseException:
            await sub.close()
            raise
        return sub

    async def _add_sharded(self, sub: PlainSubscription) -> None:
        channel = self.sharded.get(sub.key)
        try:
            if channel is None:
                channel = self.sharded[sub.key] = ShardedChannel(self, sub.key, sub.pattern)
                channel.subs.append(sub)
                await channel.start()
            else:
                channel.subs.append(sub)
        except BaseException:
            await sub.close()
            raise

    async def remove(self, sub: PlainSubscription) -> None:
        channel = self.sharded.get(sub.key) if not sub.wildcard else None
        if channel is not None:
            if sub in channel.subs:
                channel.subs.remove(sub)
            if not channel.subs:
                del self.sharded[sub.key]
                await channel.close()
            return
        table = self.globs if sub.wildcard else self.exact
        subs = table.get(sub.key)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        if subs:
            return
        del table[sub.key]
        self.confirm.pop((b"p" if sub.wildcard else b"", sub.key), None)
        conn = self.conn
        if conn is not None and conn.is_connected and self.supervisor.running:
            command = "PUNSUBSCRIBE" if sub.wildcard else "UNSUBSCRIBE"
            with contextlib.suppress(*connection_errors()):
                await conn.send_command(command, sub.key)

    async def close(self) -> None:
        await self.supervisor.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        subs = [sub for table in (self.exact, self.globs) for group in table.values()
                for sub in group]
        channels = list(self.sharded.values())
        self.sharded.clear()
        for channel in channels:
            subs += channel.subs
            await channel.close()
        self.exact.clear()
        self.globs.clear()
        for sub in subs:
            await sub.pump.close()
        await self._discard()


class ShardedChannel:
    """One sharded channel on a Redis Cluster (a reply inbox): ``SSUBSCRIBE`` on a connection
    to the master of the channel's slot, kept up by its own supervisor (a failover or a moved
    slot reconnects to the slot's new master after a refresh of the slot table)."""

    def __init__(self, pubsub: PubSub, channel: bytes, topic: str) -> None:
        broker = pubsub.broker
        self.broker = broker
        self.channel = channel
        self.topic = topic
        self.subs: list[PlainSubscription] = []
        self.conn: AbstractConnection | None = None
        self.opened = False
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.supervisor = Supervisor(
            f"Redis sharded pub/sub of {topic!r} at {broker.masked_url}", open=self._open,
            until_lost=self._read, discard=self._discard, policy=broker.reconnect,
            errors=(Exception,),
        )

    async def start(self) -> None:
        broker = self.broker
        await self.supervisor.start()
        await self.supervisor.wait_ready(broker.connect_timeout * 2)
        try:
            await asyncio.wait_for(asyncio.shield(self.confirmed), broker.connect_timeout * 2)
        except asyncio.TimeoutError as exc:
            raise BrokerConnectionError(
                f"Redis at {broker.masked_url} did not confirm the sharded subscription to "
                f"{self.topic!r}") from exc

    async def _open(self) -> None:
        topology = self.broker.topology
        assert topology is not None
        if self.opened:
            await topology.refresh()
        self.opened = True
        conn = self.conn = await open_node(topology, topology.node_of(self.channel))
        await conn.send_command("SSUBSCRIBE", self.channel)

    async def _discard(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _read(self) -> None:
        conn = self.conn
        assert conn is not None
        read = conn.read_response
        topic, subs = self.topic, self.subs
        while True:
            reply = await read(disable_decoding=True, timeout=math.inf)
            kind = reply[0]
            if kind == b"smessage":
                body = reply[2]
                for sub in subs:
                    sub.offer(Delivery(topic, body, {}))
            elif kind == b"ssubscribe":
                if not self.confirmed.done():
                    self.confirmed.set_result(None)
            elif kind == b"sunsubscribe":  # the slot moved to another node: follow it
                raise ConnectionError(f"the slot of {topic!r} moved; resubscribing")

    async def close(self) -> None:
        await self.supervisor.close()
        await self._discard()

"""Redis Cluster: which node serves a key, and the writer that pipelines per node.

Chosen once at connect (``RedisBroker(cluster=None)`` asks the node ``INFO cluster``); on a
single node none of this runs, so the single-node paths stay as they were.

- :class:`Topology`: the slot table of redis-py's ``RedisCluster`` client (it follows ``MOVED``
  for the one-off commands), refreshed at most every ``_REFRESH_EVERY`` s when a node fails or
  answers ``MOVED``; connections of our own to any node.
- :class:`ClusterWriter`: the pipelined :class:`~.writer.Writer`, one connection per master:
  each batch is split by the node serving each command's key (the stream key of a publish
  script, the stream of an ``XACK``, the channel of a reply-inbox ``PUBLISH``), the parts are
  written concurrently, and commands answered ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN``/
  ``READONLY`` are resent after a refresh (bounded by the connect timeout). A node that
  cannot be reached fails its part at once with :class:`BrokerConnectionError` (the caller's
  retry decides), as on a single node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from amb_core.adapters._client import require
from amb_core.adapters.redis import _fast
from amb_core.adapters.redis.connection import ERRORS, Pools, connect, connection_errors, make
from amb_core.adapters.redis.protocol import PUBLISH_SCRIPT, bulk, command_key
from amb_core.adapters.redis.writer import (
    Entry,
    Writer,
    durability_error,
    open_writer,
    settle_replies,
    settle_short,
)
from amb_core.broker import INBOX_PREFIX
from amb_core.errors import BrokerConnectionError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from amb_core.adapters.redis.broker import RedisBroker

logger = logging.getLogger(__name__)

_REFRESH_EVERY = 0.25


async def is_cluster(conn: AbstractConnection) -> bool:
    """Whether the node behind ``conn`` runs in cluster mode (``INFO cluster``)."""
    await conn.send_command("INFO", "cluster")
    info = await conn.read_response()
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_enabled:1" in text


class Topology:
    """Which master serves a key, from the cluster client's slot table."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.client: Any = pools.client
        self.key_slot = require("redis.crc", "redis").key_slot
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._rotation = itertools.count()

    def node_of(self, key: bytes) -> tuple[str, int]:
        """(host, port) of the master serving ``key``'s slot."""
        nodes = self.client.nodes_manager.slots_cache.get(self.key_slot(key))
        if not nodes:
            exceptions = require("redis.exceptions", "redis")
            raise exceptions.SlotNotCoveredError(f"no node serves the slot of {key!r}")
        node = nodes[0]
        return node.host, int(node.port)

    def any_node(self) -> tuple[str, int]:
        """A node in turn (masters and replicas: broadcast PUBLISH reaches every node)."""
        nodes = sorted(self.client.nodes_manager.nodes_cache.values(), key=lambda n: n.name)
        node = nodes[next(self._rotation) % len(nodes)]
        return node.host, int(node.port)

    def writer_connection(self, address: tuple[str, int]) -> AbstractConnection:
        return make(self.pools.node(*address)[0])

    def reader_connection(self, address: tuple[str, int]) -> AbstractConnection:
        return make(self.pools.node(*address)[1])

    async def refresh(self) -> None:
        """Re-read the slot table (``CLUSTER SLOTS`` from any reachable node), at most every
        ``_REFRESH_EVERY`` s; concurrent callers share one refresh."""
        task = self._refreshing
        if task is None:
            wait = self._refreshed + _REFRESH_EVERY - time.monotonic()
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh(wait))
        try:
            await asyncio.shield(task)
        except Exception as exc:  # no node reachable right now: the caller's next try retries
            logger.debug("refreshing the Redis Cluster's slots failed: %s", exc)

    async def _refresh(self, wait: float) -> None:
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            await self.client.nodes_manager.initialize()
        finally:
            self._refreshed = time.monotonic()
            self._refreshing = None


class ClusterWriter(Writer):
    """The writer with one pipelined connection per master (see the module docstring)."""

    def __init__(self, broker: RedisBroker, topology: Topology,
                 read_replies: _fast.ReadReplies) -> None:
        super().__init__(broker, None, read_replies)
        self.topology = topology
        self.conns: dict[tuple[str, int], AbstractConnection] = {}
        exceptions = require("redis.exceptions", "redis")
        self.redirects = (exceptions.AskError, exceptions.TryAgainError,
                          exceptions.ClusterDownError, exceptions.ReadOnlyError)

    def head(self, topic: str) -> tuple[bytes, bytes]:
        """Reply inboxes are sharded channels on a cluster (``SPUBLISH``, see :mod:`.pubsub`);
        everything else as on a single node."""
        if topic.startswith(INBOX_PREFIX) and topic not in self.heads:
            self.has_stream[topic] = False
            self.heads[topic] = (b"*3\r\n$8\r\nSPUBLISH\r\n" + bulk(topic.encode()), b"")
        return super().head(topic)

    async def close(self) -> None:
        await super().close()
        conns, self.conns = self.conns, {}
        for conn in conns.values():
            await conn.disconnect(nowait=True)

    async def _send(self, batch: list[Entry]) -> None:
        deadline = time.monotonic() + self.broker.connect_timeout
        while True:
            parts: dict[tuple[str, int], list[Entry]] = {}
            node_of = self.topology.node_of
            for entry in batch:
                try:
                    address = node_of(command_key(entry[0]))
                except Exception as exc:  # the slot table has a hole: refresh and retry
                    address = ("", 0)
                    logger.debug("no node for a command: %s", exc)
                part = parts.get(address)
                if part is None:
                    parts[address] = [entry]
                else:
                    part.append(entry)
            unrouted = parts.pop(("", 0), [])
            if len(parts) == 1:
                address, part = next(iter(parts.items()))
                redirected = await self._send_node(address, part)
            else:
                redirected = [entry for moved in await asyncio.gather(
                    *(self._send_node(address, part) for address, part in parts.items()))
                    for entry in moved]
            batch = unrouted + redirected
            if not batch:
                return
            if time.monotonic() > deadline:
                self._fail(batch, BrokerConnectionError(
                    f"the Redis Cluster at {self.broker.masked_url} did not settle which node "
                    "serves these keys within the connect timeout"))
                return
            await self.topology.refresh()

    async def _send_node(self, address: tuple[str, int], batch: list[Entry]) -> list[Entry]:
        """Write ``batch`` to one node; returns the entries to send again elsewhere."""
        broker = self.broker
        conn = self.conns.get(address)
        try:
            if conn is None or not conn.is_connected:
                if conn is None:
                    conn = self.topology.writer_connection(address)
                await asyncio.wait_for(open_writer(conn), broker.connect_timeout)
                self.conns[address] = conn
            wait = self.wait
            payload = b"".join([entry[0] for entry in batch])
            if wait is not None:
                payload += wait
            await conn.send_packed_command(payload, check_health=False)
            replies = await asyncio.wait_for(
                self.read_replies(conn, len(batch) + (wait is not None)), self.read_timeout)
        except connection_errors() as exc:
            self.conns.pop(address, None)
            if conn is not None:
                await conn.disconnect(nowait=True)
            acks = sum(1 for packed, _, _ in batch if b"XACK" in packed[:16])
            dropped = sum(1 for _, future, _ in batch if future is None) - acks
            self.dropped -= acks  # an XACK lost is a redelivery, not a dropped publish
            if dropped or acks:
                logger.warning("Redis Cluster node %s:%d lost (%s); %d unconfirmed pub/sub "
                               "publish(es) dropped, %d acknowledgement(s) not sent (their "
                               "messages will be redelivered)", *address, exc, dropped, acks)
            self._fail(batch, ERRORS.translate(
                exc, f"publishing to the Redis Cluster node {address[0]}:{address[1]}"))
            asyncio.get_running_loop().create_task(self.topology.refresh())
            return []
        redirected: list[Entry] = []
        retry: list[Entry] = []
        short = durability_error(broker, replies.pop()) if wait is not None else None
        if short is not None:
            retry = settle_short(batch, replies, self.has_stream, short)
        else:
            settle_replies(batch, replies, self.has_stream, retry, redirected, self.redirects)
        if retry:  # the node lost its script cache (restart, failover to a fresh replica)
            await conn.send_command("SCRIPT", "LOAD", PUBLISH_SCRIPT)
            await conn.read_response()
            redirected += await self._send_node(address, retry)
        return redirected


async def open_node(topology: Topology, address: tuple[str, int]) -> AbstractConnection:
    """A connected reader connection to one node (group readers, pub/sub)."""
    conn = topology.reader_connection(address)
    await connect(conn)
    return conn

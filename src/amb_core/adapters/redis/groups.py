"""Consumer groups on Streams: one member per group subscription.

A member reads its topic's stream with ``XREADGROUP`` on a connection of its own (``BLOCK``
shorter than that connection's socket timeout) and calls the handler inline (the bus's handler
returns once it has taken the message). Every ``claim_idle / 2`` it takes over entries left
pending by a dead member with ``XAUTOCLAIM``, with the delivery count Redis kept for each.

While a member holds an entry (waiting in its batch, or in a handler) a
:class:`~amb_core.runtime.LeaseKeeper` resets the entry's idle time (``XCLAIM`` to itself,
``JUSTID``, which leaves the delivery count alone) every ``claim_idle / 2``, so no other member
takes over a message whose handler runs longer than ``claim_idle``. The connection is kept up
by a :class:`~amb_core.runtime.Supervisor` (the reconnect policy's backoff).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from amb_core.adapters._client import require
from amb_core.adapters.redis.cluster import open_node
from amb_core.adapters.redis.connection import connect, make
from amb_core.adapters.redis.protocol import entry_body, stream_id_key
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.runtime import LeaseKeeper, Supervisor

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from amb_core.adapters.redis.broker import RedisBroker

logger = logging.getLogger(__name__)

_NOT_READ: Any = object()


class StreamDelivery(Delivery):
    __slots__ = ("_id", "_member")

    def __init__(self, member: GroupMember, entry_id: bytes, body: bytes, count: int) -> None:
        super().__init__(member.topic, body, {}, delivery_count=count,
                         position=entry_id.decode())
        self._member = member
        self._id = entry_id

    async def ack(self) -> None:
        """XACK, pipelined by the writer (a lost ack means a redelivery: at-least-once)."""
        self._member.settle(self._id)


class GroupMember(BrokerSubscription):
    def __init__(self, broker: RedisBroker, topic: str, group: str, handler: DeliveryHandler,
                 prefetch: int) -> None:
        self.broker = broker
        self.topic = topic
        self.key = broker.stream_key(topic)
        self.group = group.encode()
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".encode()
        self.handler = handler
        self.count = max(prefetch, broker.batch_size)
        self.closing = False
        self.opened = False
        self.conn: AbstractConnection | None = None
        self.leases: LeaseKeeper[bytes] = LeaseKeeper(
            self._renew, renew_after=broker.claim_idle / 2,
            name=f"Redis group {group!r} on {topic!r}",
        )
        self.supervisor = Supervisor(
            f"Redis stream reader of group {group!r} on {topic!r} at {broker.masked_url}",
            open=self._open, until_lost=self._read, discard=self._discard,
            policy=broker.reconnect, errors=(Exception,),
        )

    def __repr__(self) -> str:
        return f"<GroupMember {self.group.decode()!r} on {self.topic!r}>"

    async def start(self) -> None:
        await self.broker.create_group(self.topic, self.group)
        await self.supervisor.start()

    # --- the connection --------------------------------------------------------------------

    async def _open(self) -> None:
        topology = self.broker.topology
        if topology is None:
            conn = self.conn = make(self.broker.pools.reader)
            await connect(conn)
            return
        # Redis Cluster: the node serving the stream's slot, as known after a refresh when
        # this is a reconnect (the node died or answered MOVED).
        if self.opened:
            await topology.refresh()
        self.opened = True
        self.conn = await open_node(topology, topology.node_of(self.key))

    async def _discard(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _call(self, *args: Any) -> Any:
        conn = self.conn
        assert conn is not None
        await conn.send_command(*args)
        return await conn.read_response(disable_decoding=True)

    async def _read(self) -> None:
        """The read loop: returns or raises when the connection is lost (the supervisor then
        reconnects with backoff and calls it again)."""
        response_error = require("redis.exceptions", "redis").ResponseError
        claim_interval = self.broker.claim_idle / 2
        next_claim = 0.0
        read_ahead = False
        early: Any = _NOT_READ  # the read-ahead's reply, when it was read during a batch
        while not self.closing:
            conn = self.conn
            assert conn is not None
            try:
                if early is not _NOT_READ:
                    reply, early = early, _NOT_READ
                else:
                    if not read_ahead:
                        if time.monotonic() >= next_claim:
                            await self._claim()
                            next_claim = time.monotonic() + claim_interval
                        await self._send_read(conn, next_claim)
                    read_ahead = False
                    reply = await conn.read_response(disable_decoding=True)
                if reply:
                    entries = reply[0][1]
                    if len(entries) >= self.count and time.monotonic() < next_claim:
                        # A full batch: the stream is busy, so ask for the next one now and
                        # let Redis answer while this one is handled.
                        await self._send_read(conn, next_claim)
                        early = await self._deliver(entries, None, conn)
                        read_ahead = early is _NOT_READ
                    else:
                        await self._deliver(entries, None)
            except response_error as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                read_ahead, early = False, _NOT_READ
                logger.warning("group %s on %s vanished (deleted, or the server lost it); "
                               "re-creating it", self.group.decode(), self.topic)
                await self.broker.create_group(self.topic, self.group)
            except Exception as exc:
                if not isinstance(exc, self.broker.connection_errors):
                    logger.exception("stream reader of %s failed; restarting it", self.topic)
                raise

    async def _send_read(self, conn: AbstractConnection, next_claim: float) -> None:
        block = min(self.broker.block_timeout, max(next_claim - time.monotonic(), 0.001))
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
                                           min(ids, key=stream_id_key),
                                           max(ids, key=stream_id_key), len(ids) * 2,
                                           self.consumer)
                counts = {p[0]: int(p[3]) for p in pending}
                await self._deliver(entries, counts)
            if cursor == b"0-0" or not entries:
                return

    async def _deliver(self, entries: list[Any], counts: dict[bytes, int] | None,
                       ahead: AbstractConnection | None = None) -> Any:
        """Hand ``entries`` to the handler, in order, skipping any whose lease was lost.

        With ``ahead`` (the connection a read-ahead was sent on), a batch still running after
        ``claim_idle / 4`` reads the read-ahead's reply and renews and holds its entries at
        once: they are pending on the server from the moment Redis sent them, and would be
        taken over by another member if they only started being renewed after this batch.
        Returns that reply, or ``_NOT_READ`` when it was not read."""
        handler, leases = self.handler, self.leases
        hold = leases.hold
        for entry in entries:
            hold(entry[0])
        early: Any = _NOT_READ
        read_by = time.monotonic() + self.broker.claim_idle / 4 if ahead is not None else 0.0
        for entry_id, fields in entries:
            if self.closing:
                break
            if entry_id not in leases:
                continue  # its lease was lost to another member while it waited here
            if ahead is not None and time.monotonic() > read_by:
                early = await ahead.read_response(disable_decoding=True)
                ahead = None
                if early:
                    ids = [e[0] for e in early[0][1]]
                    for entry_ahead in ids:
                        hold(entry_ahead)
                    try:
                        await self._renew(ids)
                    except Exception:  # the lease keeper renews them on its next tick
                        logger.warning("renewing %d read-ahead entries of %s failed",
                                       len(ids), self.topic, exc_info=True)
            count = counts.get(entry_id, 1) if counts is not None else 1
            await handler(StreamDelivery(self, entry_id, entry_body(fields), count))
        return early

    def settle(self, entry_id: bytes) -> None:
        self.leases.release(entry_id)
        writer = self.broker.writer
        if writer is not None:
            writer.ack(self.key, self.group, entry_id)

    async def _renew(self, ids: list[bytes]) -> None:
        """Reset the idle time of the entries this member still owns (XCLAIM to itself,
        JUSTID: the delivery count stays); forget those another member took over."""
        client = self.broker.pools.client
        pending = await client.xpending_range(
            self.key, self.group, min=min(ids, key=stream_id_key),
            max=max(ids, key=stream_id_key), count=len(ids) * 2 + 16,
            consumername=self.consumer)
        owned = {p["message_id"] for p in pending}
        mine = [entry_id for entry_id in ids if entry_id in owned]
        lost = [entry_id for entry_id in ids if entry_id not in owned]
        if mine:
            await client.xclaim(self.key, self.group, self.consumer, min_idle_time=0,
                                message_ids=mine, justid=True)
        for entry_id in lost:
            if self.leases.release(entry_id):
                logger.info("entry %s of %s was taken over by another member of group %s",
                            entry_id.decode(), self.topic, self.group.decode())

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        await self.supervisor.close()
        await self.leases.close()
        self.leases.release_all()
        await self._discard()
        self.broker.forget_member(self)
        await self.broker.give_back(self.key, self.group, self.consumer)

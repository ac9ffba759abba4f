"""MemoryBroker: an in-process broker for tests, demos and single-process agent systems.

Nothing is shared between instances. Each subscription has a bounded buffer (``buffer_size``): a
publisher that outruns a slow subscriber waits, so memory stays bounded. A bounded log of the
last ``log_size`` messages serves :meth:`AgentMessageBus.replay`.

Messages published through the bus skip the wire envelope but not JSON: the payload is encoded
at publish (so a payload no other broker could send fails here too) and decoded per subscriber,
so subscribers never share a mutable payload. Bytes published with :meth:`publish` (as a foreign
producer would) go through the bus's envelope decoding like on any other broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from amb_core.broker import Broker, BrokerSubscription, Capabilities, Delivery, DeliveryHandler
from amb_core.envelope import OCTET_STREAM, encode_data
from amb_core.errors import NotConnected
from amb_core.message import Message
from amb_core.routing import SubscriptionIndex
from amb_core.runtime import Buffer
from amb_core.topics import matches


@dataclass(eq=False)
class _Target:
    """One channel messages are routed to: a plain subscription's own, or a group's shared one."""

    pattern: str
    group: str | None
    channel: Buffer[Delivery]
    readers: set[asyncio.Task[None]] = field(default_factory=set)


# A replay log entry, a flat tuple of plain values: cheap to build on every publish, and not
# tracked by the garbage collector (it keeps no reference to the publisher's payload objects):
# (position, topic, timestamp, body, raw_headers, is_json, id, headers, correlation_id,
#  causation_id, reply_to, source, type, key). ``raw_headers`` is set (and the rest None) for bytes
# published with ``publish``, as a foreign producer would.
_LogEntry = tuple[Any, ...]


class _MemorySubscription(BrokerSubscription):
    def __init__(self, broker: MemoryBroker, target: _Target, reader: asyncio.Task[None]) -> None:
        self._broker = broker
        self._target = target
        self._reader = reader

    async def close(self) -> None:
        self._reader.cancel()
        self._target.readers.discard(self._reader)
        if not self._target.readers:
            self._broker._remove_target(self._target)
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class _LocalDelivery(Delivery):
    """A delivery of a Message handed over in process: it carries the message and nothing to
    acknowledge (the bus reads only ``message`` from in-process deliveries)."""

    __slots__ = ()

    def __init__(self, message: Message) -> None:
        self.message = message
        self.topic = message.topic
        self.delivery_count = None


def _clone(msg: Message, payload: Any) -> Message:
    """A per-subscriber copy, cheaper than dataclasses.replace on the hot path."""
    copy = object.__new__(Message)
    copy.topic = msg.topic
    copy.payload = payload
    copy.headers = dict(msg.headers)
    copy.correlation_id = msg.correlation_id
    copy.reply_to = msg.reply_to
    copy.id = msg.id
    copy.timestamp = msg.timestamp
    copy.causation_id = msg.causation_id
    copy.attempt = msg.attempt
    copy.source = msg.source
    copy.type = msg.type
    copy.position = None
    copy.key = msg.key
    return copy


class MemoryBroker(Broker):
    """In-process broker. ``buffer_size`` bounds each subscription's queue; ``log_size`` bounds
    the replay log (0 turns it off). Pass one instance to several buses to let them talk."""

    capabilities = Capabilities(
        wildcards=True,
        consumer_groups=True,
        persistent=False,
        redelivers_unacked=False,
        replay=True,
        ordering=True,
        at_least_once=False,
        headers=True,
    )
    in_process = True

    def __init__(self, *, buffer_size: int = 128, log_size: int = 1_000) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.buffer_size = buffer_size
        self.log_size = log_size
        self._index: SubscriptionIndex[_Target] = SubscriptionIndex()
        self._groups: dict[tuple[str, str], _Target] = {}
        self._routes = self._index.cache  # read directly on the hot path
        self._log: deque[_LogEntry] = deque(maxlen=log_size or None)
        self._positions = itertools.count(1)
        self._connections = 0

    def __repr__(self) -> str:
        return f"MemoryBroker(buffer_size={self.buffer_size}, log_size={self.log_size})"

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        return cls()

    async def connect(self) -> None:
        self._connections += 1

    async def close(self) -> None:
        """Several buses may share one MemoryBroker (agents in one process): the last close
        tears it down."""
        self._connections = max(self._connections - 1, 0)
        if self._connections:
            return
        for target in self._index.values():
            for reader in list(target.readers):
                reader.cancel()
        self._index = SubscriptionIndex()
        self._routes = self._index.cache
        self._groups.clear()

    def _route(self, topic: str) -> tuple[_Target, ...]:
        targets = self._routes.get(topic)
        if targets is None:
            if not self._connections:
                raise NotConnected("MemoryBroker is not connected")
            targets = self._index.match(topic)
        return targets

    def publish_local(self, msg: Message) -> Awaitable[None] | None:
        topic = msg.topic
        targets = self._route(topic)
        body, content_type = encode_data(msg.payload, topic=topic)
        is_json = content_type != OCTET_STREAM
        if self.log_size:
            self._log.append((
                next(self._positions), topic, msg.timestamp, body, None, is_json, msg.id,
                dict(msg.headers) if msg.headers else None, msg.correlation_id,
                msg.causation_id, msg.reply_to, msg.source, msg.type, msg.key,
            ))
        blocked: list[tuple[Buffer[Delivery], Delivery]] | None = None
        for target in targets:
            payload = orjson.loads(body) if is_json else body
            delivery = _LocalDelivery(_clone(msg, payload))
            if not target.channel.offer(delivery):
                if blocked is None:
                    blocked = []
                blocked.append((target.channel, delivery))
        return None if blocked is None else _put_all(blocked)

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Bytes as a foreign producer would send them; the bus decodes them on delivery."""
        targets = self._route(topic)
        if self.log_size:
            entry = (next(self._positions), topic, time.time(), body, dict(headers), False)
            self._log.append(entry + (None,) * 8)
        for target in targets:
            await target.channel.put(Delivery(topic, body, dict(headers)))

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        if not self._connections:
            raise NotConnected("MemoryBroker is not connected")
        target = self._groups.get((group, pattern)) if group is not None else None
        if target is None:
            target = _Target(pattern, group, Buffer[Delivery](self.buffer_size))
            self._index.add(pattern, target)
            if group is not None:
                self._groups[(group, pattern)] = target
        reader = asyncio.get_running_loop().create_task(_read(target, handler))
        target.readers.add(reader)
        return _MemorySubscription(self, target, reader)

    def _remove_target(self, target: _Target) -> None:
        self._index.remove(target.pattern, target)
        if target.group is not None:
            self._groups.pop((target.group, target.pattern), None)

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        start_position = 0
        start_time = float("-inf")
        if isinstance(since, datetime):
            start_time = since.timestamp()
        elif isinstance(since, str):
            start_position = int(since)
        elif isinstance(since, int):
            start_position = since
        for entry in list(self._log):
            position, entry_topic, timestamp, body, raw_headers, is_json = entry[:6]
            if position < start_position or timestamp < start_time:
                continue
            if not matches(topic, entry_topic):
                continue
            if raw_headers is not None:
                yield Delivery(entry_topic, body, dict(raw_headers), position=position)
                continue
            (msg_id, headers, correlation_id, causation_id, reply_to, source, kind,
             key) = entry[6:]
            message = Message(
                topic=entry_topic, payload=orjson.loads(body) if is_json else body,
                headers=dict(headers or {}), correlation_id=correlation_id, reply_to=reply_to,
                id=msg_id, timestamp=timestamp, causation_id=causation_id, source=source,
                type=kind, position=position, key=key,
            )
            yield Delivery(entry_topic, body, {}, position=position, message=message)


async def _put_all(blocked: list[tuple[Buffer[Delivery], Delivery]]) -> None:
    """Wait for room in each full subscriber buffer (backpressure on the publisher)."""
    for channel, delivery in blocked:
        await channel.put(delivery)


async def _read(target: _Target, handler: DeliveryHandler) -> None:
    channel, readers = target.channel, target.readers
    while True:
        delivery = channel.poll()
        if delivery is None:
            delivery = await channel.get()
        await handler(delivery)
        if len(readers) > 1:
            # A group member whose handler never suspends would otherwise take every message
            # buffered; yielding lets the idle member that poll() woke take the next one.
            await asyncio.sleep(0)

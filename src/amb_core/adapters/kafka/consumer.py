"""One amb subscription on Kafka: a librdkafka consumer polled in a thread of its own, its
records handed to the bus through a :class:`~amb_core.runtime.Pump`, offsets committed only
for what the bus acknowledged.

- A plain subscription (no group) takes partitions itself (``assign``, no group join: it is
  ready at once) from the newest offset; a wildcard one lists topics every
  ``metadata_refresh`` seconds and reads a topic that appeared since from its beginning.
- A group subscription is a Kafka consumer group (``subscribe``; a regex subscription for a
  wildcard). A new group starts from the earliest offset kept. Offsets are committed
  explicitly, per partition, up to the first record not yet acknowledged (handlers may
  finish out of order), batched per event-loop turn (:class:`~amb_core.runtime.AckBatcher`).
  When a rebalance takes a partition away, its acknowledged offsets are committed then and
  its later acks are ignored: the new owner reads from the committed offset (at least once,
  nothing lost, nothing stalled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from amb_core.adapters.kafka.names import amb_topic
from amb_core.broker import BrokerSubscription, Delivery, DeliveryHandler
from amb_core.runtime import AckBatcher, Pump
from amb_core.topics import matches

logger = logging.getLogger(__name__)

KEY_HEADER = "ce_partitionkey"
"""The CloudEvents ``partitionkey`` extension in the Kafka binding: the record key."""

_POLL_TIMEOUT = 0.2
"""How long one ``consume`` call blocks in the consumer thread (bounds how long close waits)."""


class PartitionState:
    """What one subscription has delivered and had acknowledged on one partition it owns."""

    __slots__ = ("acked", "commit_at", "committed", "partition", "pending", "revoked", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.pending: deque[int] = deque()
        self.acked: set[int] = set()
        self.commit_at = -1
        """Offset to commit next (the first not acknowledged), -1 while nothing is."""
        self.committed = -1
        self.revoked = False

    def ack(self, offset: int) -> bool:
        """Record an ack; True when the offset to commit moved."""
        pending = self.pending
        if not pending or pending[0] != offset:
            self.acked.add(offset)
            return False
        pending.popleft()
        acked = self.acked
        while pending and pending[0] in acked:
            acked.discard(pending.popleft())
        self.commit_at = pending[0] if pending else offset + 1
        return True


class KafkaDelivery(Delivery):
    """A record of a group subscription: ``ack`` lets its offset be committed."""

    __slots__ = ("_offset", "_state", "_sub")
    _offset: int
    _state: PartitionState
    _sub: KafkaSubscription

    async def ack(self) -> None:
        state = self._state
        if not state.revoked and state.ack(self._offset):
            self._sub.acks.add(state)


class KafkaSubscription(BrokerSubscription):
    def __init__(
        self,
        *,
        consumer: Any,
        kafka: Any,
        pattern: str,
        topics: list[str],
        regex: str | None,
        group: str | None,
        handler: DeliveryHandler,
        buffer: int,
        batch: int,
        metadata_refresh: float,
        on_closed: Callable[[KafkaSubscription], None],
    ) -> None:
        self.consumer = consumer
        self._kafka = kafka
        self.pattern = pattern
        self._topics = topics
        self._regex = re.compile(regex) if regex is not None else None
        self.group = group
        self._handler = handler
        self._batch = batch
        self._refresh = metadata_refresh
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._states: dict[tuple[str, int], PartitionState] = {}
        self._names: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._assigned = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()
        self.pump: Pump[list[Any]] = Pump(
            self._deliver, max_items=buffer, name=f"kafka subscription {pattern!r}"
        )
        self.acks: AckBatcher[PartitionState] = AckBatcher(
            self._commit, name=f"kafka commits of {pattern!r}"
        )
        self._known: set[str] = set()
        self._outbox: dict[tuple[str, int], PartitionState] = {}
        self._outbox_lock = threading.Lock()

    # --- start --------------------------------------------------------------------------------

    async def start(self, ready_timeout: float) -> None:
        """Take partitions (plain) or join the group, then poll in a thread; return once
        records published from now on reach this subscription."""
        if self.group is None:
            await asyncio.to_thread(self._assign_initial)
        else:
            self._subscribe_group()
        self._thread = threading.Thread(
            target=self._run, name=f"amb-kafka {self.pattern}", daemon=True
        )
        self._thread.start()
        if self.group is not None:
            try:
                await asyncio.wait_for(self._assigned.wait(), ready_timeout)
            except asyncio.TimeoutError:
                logger.warning("kafka group %r on %r: no assignment within %.1fs; records "
                               "published meanwhile wait for it", self.group, self.pattern,
                               ready_timeout)

    def _matching(self, names: Any) -> list[str]:
        regex = self._regex
        assert regex is not None
        found = []
        for name in names:
            if regex.match(name) and matches(self.pattern, amb_topic(name)):
                found.append(name)
        return found

    def _assign_initial(self) -> None:
        """Plain subscription: every partition of the topic(s), from the newest offset."""
        consumer, kafka = self.consumer, self._kafka
        metadata = consumer.list_topics(timeout=10)
        names = self._topics if self._regex is None else self._matching(metadata.topics)
        partitions = []
        for name in names:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                topic = consumer.list_topics(name, timeout=10).topics[name]
            for partition in topic.partitions:
                tp = kafka.TopicPartition(name, partition)
                _, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                partitions.append(kafka.TopicPartition(name, partition, max(high, 0)))
            self._known.add(name)
        consumer.assign(partitions)

    def _discover(self) -> None:
        """Plain wildcard subscription: topics created since we looked, from their beginning."""
        kafka, consumer = self._kafka, self.consumer
        try:
            metadata = consumer.list_topics(timeout=5)
        except kafka.KafkaException as exc:
            logger.debug("kafka metadata refresh for %r failed: %s", self.pattern, exc)
            return
        new = [name for name in self._matching(metadata.topics) if name not in self._known]
        if not new:
            return
        partitions = [
            kafka.TopicPartition(name, partition, kafka.OFFSET_BEGINNING)
            for name in new for partition in metadata.topics[name].partitions
        ]
        consumer.incremental_assign(partitions)
        self._known.update(new)

    def _subscribe_group(self) -> None:
        topics = self._topics if self._regex is None else [self._regex.pattern]
        self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    # --- rebalance callbacks (consumer thread) ----------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self._states[(tp.topic, tp.partition)] = PartitionState(tp.topic, tp.partition)
        self._loop.call_soon_threadsafe(self._assigned.set)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            state = self._states.pop((tp.topic, tp.partition), None)
            if state is not None:
                state.revoked = True

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        offsets = []
        for tp in partitions:
            state = self._states.pop((tp.topic, tp.partition), None)
            if state is None:
                continue
            state.revoked = True
            if state.commit_at > state.committed:
                offsets.append(self._kafka.TopicPartition(state.topic, state.partition,
                                                          state.commit_at))
        if offsets:
            with contextlib.suppress(self._kafka.KafkaException):
                consumer.commit(offsets=offsets, asynchronous=False)

    # --- the consumer thread ------------------------------------------------------------------

    def _run(self) -> None:
        consumer, batch, stop = self.consumer, self._batch, self._stop
        loop, pump = self._loop, self.pump
        wildcard_plain = self.group is None and self._regex is not None
        next_refresh = time.monotonic() + self._refresh
        grouped = self.group is not None
        while not stop.is_set():
            if grouped:
                self._commit_outbox()
            try:
                records = consumer.consume(batch, _POLL_TIMEOUT)
            except Exception as exc:  # the consumer was closed under us, or a fatal error
                if stop.is_set():
                    return
                logger.warning("kafka consumer of %r: %s", self.pattern, exc)
                time.sleep(_POLL_TIMEOUT)
                continue
            if records:
                good = [record for record in records if record.error() is None]
                if len(good) != len(records):
                    for record in records:
                        error = record.error()
                        if error is not None and error.code() != -191:  # _PARTITION_EOF
                            logger.debug("kafka consumer of %r: %s", self.pattern, error)
                if good:
                    try:
                        future = asyncio.run_coroutine_threadsafe(pump.put(good), loop)
                    except RuntimeError:
                        return  # the loop is closed
                    while not stop.is_set():
                        try:
                            future.result(_POLL_TIMEOUT)
                            break
                        except TimeoutError:
                            if grouped:
                                self._commit_outbox()
                            continue
                        except Exception:
                            return  # the loop is gone
            if wildcard_plain and time.monotonic() >= next_refresh:
                self._discover()
                next_refresh = time.monotonic() + self._refresh

    # --- the loop side --------------------------------------------------------------------------

    def _topic(self, name: str) -> str | None:
        """The amb topic of a Kafka name, None when the pattern does not match it (a regex
        subscription is filtered segment-exactly here)."""
        topic = amb_topic(name)
        if not matches(self.pattern, topic):
            topic = None  # type: ignore[assignment]
        self._names[name] = topic
        return topic

    async def _deliver(self, records: list[Any]) -> None:
        handler, names, states = self._handler, self._names, self._states
        grouped = self.group is not None
        for record in records:
            if self._closed:
                return
            name = record.topic()
            topic = names[name] if name in names else self._topic(name)
            if topic is None:
                continue
            raw = record.headers()
            headers = {k: v.decode("utf-8", "replace") if v is not None else ""
                       for k, v in raw} if raw else {}
            if KEY_HEADER not in headers:
                key = record.key()
                if key is not None:
                    headers[KEY_HEADER] = key.decode("utf-8", "replace")
            partition, offset = record.partition(), record.offset()
            body = record.value() or b""
            delivery: Delivery
            if grouped:
                state = states.get((name, partition))
                if state is None or state.revoked:
                    continue  # the partition went to another member: it reads it from there
                state.pending.append(offset)
                grouped_delivery = KafkaDelivery(topic, body, headers,
                                                 position=f"{partition}:{offset}")
                grouped_delivery._state = state
                grouped_delivery._offset = offset
                grouped_delivery._sub = self
                delivery = grouped_delivery
            else:
                delivery = Delivery(topic, body, headers, position=f"{partition}:{offset}")
            await handler(delivery)

    def _commit(self, states: list[PartitionState]) -> None:
        """Hand the offsets acknowledged this turn to the consumer thread, which commits
        them (librdkafka's commit called from the loop thread while that thread polls
        could block the loop)."""
        with self._outbox_lock:
            outbox = self._outbox
            for state in states:
                if not state.revoked and state.commit_at > state.committed:
                    outbox[(state.topic, state.partition)] = state

    def _commit_outbox(self) -> None:
        """Consumer thread: commit what the loop handed over, asynchronously."""
        with self._outbox_lock:
            if not self._outbox:
                return
            states, self._outbox = list(self._outbox.values()), {}
        kafka = self._kafka
        offsets = []
        for state in states:
            at = state.commit_at
            if not state.revoked and at > state.committed:
                state.committed = at
                offsets.append(kafka.TopicPartition(state.topic, state.partition, at))
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except kafka.KafkaException as exc:
                logger.debug("kafka commit of %r failed (a rebalance?): %s", self.pattern, exc)

    # --- close --------------------------------------------------------------------------------

    async def close(self) -> None:
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            await self.pump.close()
            await self.acks.close()
            thread, self._thread = self._thread, None
            if thread is not None:
                await asyncio.to_thread(thread.join, 5)
            await asyncio.to_thread(self._close_consumer)
            self._on_closed(self)

    def _close_consumer(self) -> None:
        consumer = self.consumer
        if self.group is not None:
            with self._outbox_lock:
                self._outbox.clear()
            offsets = [
                self._kafka.TopicPartition(s.topic, s.partition, s.commit_at)
                for s in list(self._states.values())
                if not s.revoked and s.commit_at > s.committed
            ]
            if offsets:
                with contextlib.suppress(Exception):
                    consumer.commit(offsets=offsets, asynchronous=False)
        with contextlib.suppress(Exception):
            consumer.close()

"""KafkaBroker beyond the contract: names, URLs, secrets, ordering keys, redelivery to the next
group member, delete_group, a broker killed mid-stream, and the event-sourcing audit example.
Runs on the tansu of tests/kafka_servers.py (or AMB_KAFKA_BOOTSTRAP)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from tests.kafka_servers import Tansu, durable_tansu, kafka_bootstrap  # noqa: F401

from amb_core import AgentMessageBus, Message
from amb_core.adapters import broker_from_url
from amb_core.adapters.kafka import KafkaBroker
from amb_core.adapters.kafka.consumer import KEY_HEADER, PartitionState
from amb_core.adapters.kafka.names import amb_topic, kafka_regex, kafka_topic
from amb_core.broker import Delivery
from amb_core.errors import BrokerConnectionError, UnsupportedFeature
from amb_core.runtime import ReconnectPolicy
from amb_core.testing.contract import Collector

FAST: dict[str, Any] = {"session_timeout": 1.0, "metadata_refresh": 0.5}


def unique() -> str:
    return f"kt.{uuid.uuid4().hex[:10]}"


# --- no broker needed -----------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a.b", "amb.dead-letter", "_amb.inbox.x_y", "événements.用户",
                                   "a b".replace(" ", "~"), "x" * 249])
def test_topic_names_map_and_read_back(topic: str) -> None:
    name = kafka_topic(topic)
    assert all((c.isalnum() and c.isascii()) or c in "._-" for c in name)
    assert len(name) <= 249
    assert amb_topic(name) == topic


@pytest.mark.parametrize("topic", ["x" * 250, "é" * 63, "a__3fb"])
def test_topics_that_cannot_map_are_refused_clearly(topic: str) -> None:
    with pytest.raises(ValueError, match=r"Kafka|reserves"):
        kafka_topic(topic)


def test_wildcards_become_segment_exact_regexes() -> None:
    import re

    star = re.compile(kafka_regex("ev.user.*"))
    tail = re.compile(kafka_regex("ev.>"))
    assert star.match("ev.user.created") and not star.match("ev.user.a.b")
    assert not star.match("ev.user") and not star.match("ev.userx.a")
    assert tail.match("ev.a.b") and not tail.match("ev") and not tail.match("evx.a")


def test_from_url_and_no_secret_in_repr() -> None:
    broker = broker_from_url("kafka://alice:s3cr%40t@k1:9092,k2:9093?partitions=3")
    assert isinstance(broker, KafkaBroker)
    assert broker.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert broker.partitions == 3 and not broker.capabilities.ordering
    assert broker._common["sasl.password"] == "s3cr@t"
    assert broker._common["security.protocol"] == "SASL_PLAINTEXT"
    assert "s3cr" not in repr(broker)
    tls = KafkaBroker.from_url("kafkas://h:9093")
    assert tls._common["security.protocol"] == "SSL"
    scram = KafkaBroker.from_url("kafkas://u:p@h:9093?sasl_mechanism=SCRAM-SHA-512")
    assert scram._common["sasl.mechanism"] == "SCRAM-SHA-512"
    assert scram._common["security.protocol"] == "SASL_SSL"
    with pytest.raises(ValueError):
        KafkaBroker.from_url("kafka://h:1?bogus=1")


def test_commit_offset_waits_for_the_first_unacknowledged_record() -> None:
    state = PartitionState("t", 0)
    state.pending.extend([5, 6, 7])
    assert not state.ack(6) and state.commit_at == -1  # 5 still runs
    assert state.ack(5) and state.commit_at == 7  # 5 and 6 done: commit up to 7
    assert state.ack(7) and state.commit_at == 8


async def test_connect_to_nothing_fails_within_the_timeout() -> None:
    broker = KafkaBroker("127.0.0.1:1", reconnect=ReconnectPolicy(connect_timeout=1.0))
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError):
        await broker.connect()
    assert time.monotonic() - started < 5


# --- on the broker --------------------------------------------------------------------------


async def test_ordering_on_one_partition_and_per_key_on_several(
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    one = KafkaBroker(kafka_bootstrap, **FAST)
    three = KafkaBroker(kafka_bootstrap, partitions=3, **FAST)
    await one.connect()
    await three.connect()
    try:
        single, keyed = unique(), unique()
        got: dict[str, list[Delivery]] = {single: [], keyed: []}

        async def take(delivery: Delivery) -> None:
            got[delivery.topic].append(delivery)

        await one.subscribe(single, take)
        await three.subscribe(keyed, take)
        await asyncio.gather(*(one.publish(single, str(i).encode(), {}) for i in range(300)))
        for i in range(300):  # keys k0..k4, each in order
            await three.publish(keyed, str(i).encode(), {KEY_HEADER: f"k{i % 5}"})
        deadline = time.monotonic() + 15
        while len(got[single]) < 300 or len(got[keyed]) < 300:
            assert time.monotonic() < deadline, {k: len(v) for k, v in got.items()}
            await asyncio.sleep(0.05)
        assert [int(d.body) for d in got[single]] == list(range(300))
        partitions_used = {d.position.split(":")[0] for d in got[keyed]}  # type: ignore[union-attr]
        assert len(partitions_used) >= 2, "keys should spread over the partitions"
        for k in range(5):
            bodies = [int(d.body) for d in got[keyed] if d.headers[KEY_HEADER] == f"k{k}"]
            assert bodies == list(range(k, 300, 5))
    finally:
        await one.close()
        await three.close()


async def test_record_key_of_a_plain_producer_comes_back_as_the_partition_key(
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    from confluent_kafka import Producer

    topic = unique()
    broker = KafkaBroker(kafka_bootstrap, **FAST)
    await broker.connect()
    try:
        seen: list[Delivery] = []

        async def take(delivery: Delivery) -> None:
            seen.append(delivery)

        await broker.subscribe(topic, take)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(kafka_topic(topic), b"raw", key=b"order-42")
        await asyncio.to_thread(producer.flush, 10)
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert seen[0].headers == {KEY_HEADER: "order-42"} and seen[0].body == b"raw"
    finally:
        await broker.close()


async def test_unacknowledged_records_go_to_the_next_member_acknowledged_ones_do_not(
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    """Kafka keeps no delivery count (docs/kafka.md), but what a member did not acknowledge
    is read again by the member that takes its partition."""
    topic = unique()
    first = KafkaBroker(kafka_bootstrap, **FAST)
    await first.connect()
    seen: list[bytes] = []
    both = asyncio.Event()

    async def ack_only_the_first(delivery: Delivery) -> None:
        seen.append(delivery.body)
        if delivery.body == b"acked":
            await delivery.ack()
        if len(seen) >= 2:
            both.set()

    sub = await first.subscribe(topic, ack_only_the_first, group="g")
    await first.publish(topic, b"acked", {})
    await first.publish(topic, b"unacked", {})
    await asyncio.wait_for(both.wait(), 15)
    await sub.close()
    await first.close()

    second = KafkaBroker(kafka_bootstrap, **FAST)
    await second.connect()
    try:
        again = Collector()
        bodies: list[bytes] = []

        async def record(delivery: Delivery) -> None:
            bodies.append(delivery.body)
            await delivery.ack()
            await again(Message(topic=topic, payload=delivery.body))

        await second.subscribe(topic, record, group="g")
        await again.wait_for(lambda: b"unacked" in bodies, 15)
        await asyncio.sleep(0.3)
        assert bodies == [b"unacked"]
    finally:
        await second.close()


async def test_delete_group_forgets_its_offsets(kafka_bootstrap: str) -> None:  # noqa: F811
    topic = unique()
    bus = AgentMessageBus(broker=KafkaBroker(kafka_bootstrap, **FAST))
    await bus.connect()
    try:
        got = Collector()
        sub = await bus.subscribe(topic, got, consumer_group="readers")
        for i in range(3):
            await bus.publish(Message(topic=topic, payload=i))
        await got.wait_count(3, 15)
        await sub.unsubscribe()
        await bus.broker.delete_group(topic, "readers")  # bus.delete_consumer_group soon
        again = Collector()
        await bus.subscribe(topic, again, consumer_group="readers")
        await again.wait_count(3, 15)  # a new group again: from the earliest offset
        assert again.payloads == [0, 1, 2]
        await bus.broker.delete_group(topic, "nobody")  # unknown group: nothing to do
    finally:
        await bus.close()


async def test_remove_dead_letters_says_kafka_cannot(kafka_bootstrap: str) -> None:  # noqa: F811
    broker = KafkaBroker(kafka_bootstrap, **FAST)
    with pytest.raises(UnsupportedFeature, match="cannot delete single records"):
        await broker.remove_dead_letters("amb.dead-letter", ["0:0"])


async def test_a_group_on_a_wildcard_sees_a_topic_created_later_within_seconds(
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    base = unique()
    bus = AgentMessageBus(broker=KafkaBroker(kafka_bootstrap, **FAST))
    await bus.connect()
    try:
        got = Collector()
        await bus.subscribe(f"{base}.>", got, consumer_group="late")
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await bus.publish(Message(topic=f"{base}.new.topic", payload="first"))
        await got.wait_count(1, 15)
        assert got.payloads == ["first"]
        assert time.monotonic() - started < 10
    finally:
        await bus.close()


async def test_broker_killed_mid_stream_a_group_loses_nothing(durable_tansu: Tansu) -> None:  # noqa: F811
    topic = unique()
    options = {**FAST, "reconnect": ReconnectPolicy(initial_delay=0.05, max_delay=0.5)}
    publisher = AgentMessageBus(broker=KafkaBroker(durable_tansu.bootstrap, **options))
    consumer = AgentMessageBus(broker=KafkaBroker(durable_tansu.bootstrap, **options))
    await publisher.connect()
    await consumer.connect()
    try:
        got = Collector()
        await consumer.subscribe(topic, got, consumer_group="survivors")
        sent = 0

        async def publish_until(count: int) -> None:
            nonlocal sent
            while sent < count:
                await publisher.publish(Message(topic=topic, payload=sent))
                sent += 1

        await publish_until(100)
        await got.wait_for(lambda: len(got.messages) >= 50, 15)
        await asyncio.to_thread(durable_tansu.kill)
        stalled = asyncio.ensure_future(publish_until(200))  # waits while tansu is down
        await asyncio.sleep(1.0)
        await asyncio.to_thread(durable_tansu.start)
        await asyncio.wait_for(stalled, 60)
        await got.wait_for(lambda: set(got.payloads) >= set(range(200)), 60)
    finally:
        await publisher.close()
        await consumer.close()


async def test_event_sourcing_audit_replays_an_agents_events(
    kafka_bootstrap: str,  # noqa: F811
) -> None:
    """The seed's example: agents publish their events as they act; later an auditor
    replays them from the log, all of them or from a position or a time, in order."""
    agent = f"{unique()}.agent-7"
    bus = AgentMessageBus(broker=KafkaBroker(kafka_bootstrap, **FAST))
    await bus.connect()
    try:
        steps = ["task.received", "tool.called", "tool.returned", "answer.sent"]
        for n, step in enumerate(steps):
            await bus.publish(Message(topic=f"{agent}.events", payload={"n": n, "step": step},
                                      correlation_id="task-1"))
            await asyncio.sleep(0.01)
        await bus.close()

        auditor = AgentMessageBus(broker=KafkaBroker(kafka_bootstrap, **FAST))
        await auditor.connect()
        trail = [m async for m in auditor.replay(f"{agent}.events")]
        assert [m.payload["step"] for m in trail] == steps
        assert {m.correlation_id for m in trail} == {"task-1"}
        assert all(m.position is not None for m in trail)
        from_third = [m.payload["n"] async for m in auditor.replay(f"{agent}.events",
                                                                     since=trail[2].position)]
        assert from_third == [2, 3]
        since_time = [m.payload["n"] async for m in auditor.replay(f"{agent}.>",
                                                                     since=trail[1].timestamp)]
        assert since_time == [1, 2, 3]
        await auditor.close()
    finally:
        await bus.close()

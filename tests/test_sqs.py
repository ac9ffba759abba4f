"""The SQS adapter's own tests: names and filter policies (no server), then on moto: wildcards
kept segment-exact, FIFO order per key, the 12-hour visibility cap, large payloads via S3."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from tests.moto_servers import MotoServer, moto_server  # noqa: F401
from tests.test_contract_sqs import sqs_broker

from amb_core import AgentMessageBus, Message
from amb_core.adapters import AWSSQSBroker, broker_from_url
from amb_core.adapters.sqs import filter_policy, queue_name
from amb_core.adapters.sqs import subscriptions as sqs_subscriptions
from amb_core.adapters.sqs.naming import exact_on_sns
from amb_core.adapters.sqs.payloads import POINTER_CLASS, SIZE_ATTRIBUTE
from amb_core.broker import Delivery
from amb_core.errors import NotConnected

# --- no server ---------------------------------------------------------------------------


def test_queue_names_are_valid_unique_and_readable() -> None:
    names = {queue_name("amb", "group", "workers", p) for p in ("a.b", "a_b", "a.*", "a.>")}
    assert len(names) == 4
    long = queue_name("amb", "group", "g" * 100, "événements." * 20 + "x", fifo=True)
    assert len(long) <= 80 and long.endswith(".fifo")
    for name in names | {long}:
        assert all(c.isalnum() or c in "-_." for c in name)
    assert queue_name("amb", "group", "workers", "orders.created").startswith(
        "amb-g-workers-orders_created-")


def test_filter_policies() -> None:
    assert filter_policy("a.b") == {"amb-topic": ["a.b"]}
    assert filter_policy("events.user.*") == {
        "amb-topic": [{"prefix": "events.user."}], "amb-depth": [{"numeric": ["=", 3]}]}
    assert filter_policy("events.>") == {"amb-topic": [{"prefix": "events."}]}
    assert filter_policy("a.*.c") == {
        "amb-topic": [{"prefix": "a."}], "amb-depth": [{"numeric": ["=", 3]}]}
    assert filter_policy("*.b.>") == {
        "amb-topic": [{"exists": True}], "amb-depth": [{"numeric": [">=", 3]}]}
    assert exact_on_sns("a.b.*") and exact_on_sns("a.>") and not exact_on_sns("a.*.c")
    with pytest.raises(ValueError):
        filter_policy("a..b")


def test_from_url_and_options() -> None:
    broker = broker_from_url("sqs://eu-west-1/orders?fifo=true&high_throughput=1"
                             "&endpoint_url=http://127.0.0.1:4566&visibility_timeout=60")
    assert isinstance(broker, AWSSQSBroker)
    assert (broker.region_name, broker.queue_name, broker.use_fifo, broker.high_throughput,
            broker.endpoint_url, broker.visibility_timeout) == (
        "eu-west-1", "orders", True, True, "http://127.0.0.1:4566", 60)
    assert broker.capabilities.ordering_keys and broker.topic_name == "orders.fifo"
    plain = AWSSQSBroker()
    assert not plain.capabilities.ordering_keys and not plain.capabilities.ordering
    assert plain.capabilities.max_payload == 262_144 - 2_048
    assert AWSSQSBroker(large_payload_bucket="b").capabilities.max_payload is None
    with pytest.raises(ValueError):
        AWSSQSBroker(queue_name="has.dots")
    with pytest.raises(ValueError):
        AWSSQSBroker(high_throughput=True)


async def test_publish_before_connect_raises_not_connected() -> None:
    with pytest.raises(NotConnected):
        await AWSSQSBroker().publish("a.b", b"{}", {})


# --- on moto -----------------------------------------------------------------------------


@pytest.fixture
async def make_bus(moto_server: MotoServer):  # noqa: F811
    moto_server.reset()
    buses: list[AgentMessageBus] = []

    async def make(**options: Any) -> AgentMessageBus:
        bus = AgentMessageBus(broker=sqs_broker(moto_server.url, **options))
        await bus.connect()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(timeout=2.0)


async def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_one_segment_star_never_gets_deeper_topics(make_bus: Any) -> None:
    bus = await make_bus()
    star: list[str] = []
    middle: list[str] = []

    async def on_star(msg: Message) -> None:
        star.append(msg.topic)

    async def on_middle(msg: Message) -> None:
        middle.append(msg.topic)

    await bus.subscribe("t.events.user.*", on_star)
    await bus.subscribe("t.*.user.created", on_middle)
    for topic in ("t.events.user.a.b", "t.events.user", "t.events.order.created",
                  "t.other.user.created", "t.events.user.created", "t.x.user.created.y"):
        await bus.publish(Message(topic=topic, payload=topic))
    await bus.publish(Message(topic="t.events.user.done", payload="done"))
    await wait_until(lambda: "t.events.user.done" in star and len(middle) >= 2)
    await asyncio.sleep(0.5)
    assert sorted(star) == ["t.events.user.created", "t.events.user.done"]
    assert sorted(middle) == ["t.events.user.created", "t.other.user.created"]


async def test_fifo_keeps_order_per_key_across_members(make_bus: Any) -> None:
    first = await make_bus(use_fifo=True)
    second = await make_bus(use_fifo=True)
    seen: dict[str, list[int]] = {}
    members: set[int] = set()

    def member(index: int) -> Any:
        async def handle(msg: Message) -> None:
            members.add(index)
            seen.setdefault(msg.key or "", []).append(msg.payload)
            await asyncio.sleep(0.005)
        return handle

    await first.subscribe("orders", member(0), consumer_group="fifo")
    await second.subscribe("orders", member(1), consumer_group="fifo")
    keys = [f"customer-{k}" for k in range(4)]
    await asyncio.gather(*(
        first.publish(Message(topic="orders", payload=i, key=key))
        for i in range(8) for key in keys
    ))
    await wait_until(lambda: sum(len(v) for v in seen.values()) >= 32, timeout=60)
    for key in keys:
        assert seen[key] == sorted(seen[key]) == list(range(8)), (key, seen[key])


async def test_fifo_deduplicates_a_message_sent_twice(make_bus: Any) -> None:
    bus = await make_bus(use_fifo=True)
    got: list[Any] = []

    async def take(msg: Message) -> None:
        # Held (not deleted) a while: moto forgets a deduplication id once its message is
        # deleted, where SQS keeps it for 5 minutes (docs/sqs.md), so keep it in the queue.
        await asyncio.sleep(1.0)
        got.append(msg.payload)

    await bus.subscribe("dedup", take, consumer_group="once")
    msg = Message(topic="dedup", payload="only once", key="k")
    await bus.publish(msg)
    await bus.publish(msg)
    await bus.publish(Message(topic="dedup", payload="sentinel", key="k"))
    await wait_until(lambda: "sentinel" in got)
    assert got == ["only once", "sentinel"]


async def test_visibility_renewed_then_the_12_hour_cap_logged(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    moto_server.reset()
    monkeypatch.setattr(sqs_subscriptions, "MAX_VISIBILITY", 6)
    broker = sqs_broker(moto_server.url, visibility_timeout=2, wait_time_seconds=1)
    await broker.connect()
    deliveries: list[Delivery] = []
    got = asyncio.Event()

    async def hold(delivery: Delivery) -> None:
        deliveries.append(delivery)
        got.set()

    try:
        sub = await broker.subscribe("lease.t", hold, group="slow")
        with caplog.at_level(logging.ERROR, logger="amb_core.adapters.sqs.subscriptions"):
            await broker.publish("lease.t", b'{"x": 1}', {})
            await asyncio.wait_for(got.wait(), 20)
            await asyncio.sleep(3.5)  # past the 2 s visibility: renewed, not redelivered
            assert len(deliveries) == 1
            assert sub.leases.renewals >= 1  # type: ignore[attr-defined]
            await wait_until(lambda: "12 hours" in caplog.text, timeout=10)
        await wait_until(lambda: len(deliveries) >= 2, timeout=15)  # visible again: redelivered
        assert deliveries[1].delivery_count == 2
    finally:
        await broker.close()


async def test_over_the_limit_is_a_clear_value_error(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(ValueError, match="limit"):
        await bus.publish(Message(topic="big", payload="x" * 300_000))
    with pytest.raises(ValueError, match="limit"):
        await bus.broker.publish("big", b"x" * 262_000, {"x-a": "y" * 1000})


async def test_large_payload_through_s3_with_the_extended_client_pointer(
    make_bus: Any, moto_server: MotoServer  # noqa: F811
) -> None:
    from aiobotocore.session import get_session

    bucket = "amb-large"
    async with get_session().create_client("s3", region_name="us-east-1",
                                           endpoint_url=moto_server.url) as s3:
        await s3.create_bucket(Bucket=bucket)
        bus = await make_bus(large_payload_bucket=bucket)
        got: list[Message] = []

        async def take(msg: Message) -> None:
            got.append(msg)

        broker = bus.broker
        # A group queue left without members: a plain SQS consumer reads the pointer there.
        sub = await bus.subscribe("large", take, consumer_group="readers")
        await sub.unsubscribe()
        big = {"text": "é" * 400_000, "n": 1}
        await bus.publish(Message(topic="large", payload=big))
        url = (await broker.sqs.get_queue_url(
            QueueName=broker.group_queue_name("readers", "large")))["QueueUrl"]
        raw = (await broker.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5,
                                                MessageAttributeNames=["All"]))["Messages"][0]
        import orjson

        kind, pointer = orjson.loads(raw["Body"])
        assert kind == POINTER_CLASS and pointer["s3BucketName"] == bucket
        size = int(raw["MessageAttributes"][SIZE_ATTRIBUTE]["StringValue"])
        stored = await s3.get_object(Bucket=bucket, Key=pointer["s3Key"])
        async with stored["Body"] as stream:
            data = await stream.read()
        assert len(data) == size > 800_000
        assert orjson.loads(data)["data"] == big  # the structured envelope, in S3
        await broker.sqs.change_message_visibility(QueueUrl=url,
                                                   ReceiptHandle=raw["ReceiptHandle"],
                                                   VisibilityTimeout=0)
        await bus.subscribe("large", take, consumer_group="readers")
        await wait_until(lambda: len(got) == 1)
        assert got[0].payload == big


def test_missing_moto_fails_when_ci_requires_sqs(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import moto_servers

    monkeypatch.setenv("AMB_REQUIRE_BROKERS", "redis,sqs")
    with pytest.raises(pytest.fail.Exception, match="requires sqs"):
        moto_servers._unavailable("moto not installed")
    monkeypatch.setenv("AMB_REQUIRE_BROKERS", "redis")
    with pytest.raises(pytest.skip.Exception):
        moto_servers._unavailable("moto not installed")


async def test_ack_after_the_lease_was_given_up_still_deletes(
    moto_server: MotoServer,  # noqa: F811
) -> None:
    """Past the 12 h cap the keeper stops renewing; a handler that then finishes must still
    delete the message (an ack that checked the lease first did nothing)."""
    moto_server.reset()
    broker = sqs_broker(moto_server.url, visibility_timeout=2, wait_time_seconds=1)
    await broker.connect()
    deliveries: list[Delivery] = []
    got = asyncio.Event()

    async def hold(delivery: Delivery) -> None:
        deliveries.append(delivery)
        got.set()

    try:
        sub: Any = await broker.subscribe("given.up", hold, group="g")
        await broker.publish("given.up", b'{"x": 1}', {})
        await asyncio.wait_for(got.wait(), 20)
        assert sub.leases.release(deliveries[0])  # what the cap does
        await deliveries[0].ack()
        await sub.acks.flush()
        assert sub.acks.sent == 1
        await asyncio.sleep(3.5)  # past the visibility timeout: it would be back
        assert len(deliveries) == 1
    finally:
        await broker.close()


async def _queue_names(broker: AWSSQSBroker) -> set[str]:
    response = await broker.sqs.list_queues(QueueNamePrefix=broker.queue_name)
    return {url.rsplit("/", 1)[-1] for url in response.get("QueueUrls", [])}


async def test_delete_group_removes_its_queue_and_what_waits_in_it(make_bus: Any) -> None:
    bus = await make_bus()
    broker: AWSSQSBroker = bus.broker

    async def ignore(msg: Message) -> None:
        return None

    sub = await bus.subscribe("doomed.t", ignore, consumer_group="doomed")
    await sub.unsubscribe()
    await bus.publish(Message(topic="doomed.t", payload="waits"))
    name = broker.group_queue_name("doomed", "doomed.t")
    assert name in await _queue_names(broker)
    await bus.delete_consumer_group("doomed.t", "doomed")
    assert name not in await _queue_names(broker)
    subscriptions = await broker.sns.list_subscriptions_by_topic(TopicArn=broker.topic_arn)
    assert not [s for s in subscriptions["Subscriptions"] if s["Endpoint"].endswith(name)]
    await bus.delete_consumer_group("doomed.t", "doomed")  # gone already: no error
    got: list[Any] = []

    async def take(msg: Message) -> None:
        got.append(msg.payload)

    await bus.subscribe("doomed.t", take, consumer_group="doomed")  # a new, empty group
    await bus.publish(Message(topic="doomed.t", payload="fresh"))
    await wait_until(lambda: "fresh" in got)
    assert got == ["fresh"]


async def test_plain_and_reply_queues_are_deleted_on_close(make_bus: Any) -> None:
    bus = await make_bus()
    broker: AWSSQSBroker = bus.broker

    async def echo(msg: Message) -> Any:
        return msg.payload

    before = await _queue_names(broker)
    await bus.subscribe("echo", echo)
    assert (await bus.request(Message(topic="echo", payload=1), timeout=20)).payload == 1
    during = await _queue_names(broker)
    assert len([n for n in during - before if "-s-" in n]) == 1
    assert len([n for n in during - before if "-r-" in n]) == 1
    other = await make_bus()
    await bus.close()
    after = await _queue_names(other.broker)
    assert not [n for n in after if "-s-" in n or "-r-" in n]
    assert [n for n in during - before if "-d-" in n] == [broker.keeper_queue_name(
        "amb.dead-letter")]  # the dead-letter keeper stays
    assert broker.keeper_queue_name("amb.dead-letter") in after

"""The bus's own API and semantics on MemoryBroker (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import pytest

from amb_core import (
    AgentMessageBus,
    Message,
    NotConnected,
    RequestTimeout,
    RetryPolicy,
)
from amb_core.adapters import (
    AWSSQSBroker,
    AzureServiceBusBroker,
    KafkaBroker,
    MemoryBroker,
    NATSBroker,
    RabbitMQBroker,
    RedisBroker,
    broker_from_url,
)
from amb_core.testing import Collector


async def test_default_broker_is_memory_and_context_manager_connects() -> None:
    bus = AgentMessageBus()
    assert isinstance(bus.broker, MemoryBroker)
    async with bus:
        assert bus.is_connected
    assert not bus.is_connected


async def test_use_before_connect_is_a_clear_error() -> None:
    bus = AgentMessageBus()
    with pytest.raises(NotConnected, match="connect"):
        await bus.publish(Message(topic="a", payload=1))
    with pytest.raises(NotConnected):
        await bus.subscribe("a", Collector())


async def test_two_memory_brokers_share_nothing() -> None:
    async with AgentMessageBus(MemoryBroker()) as one, AgentMessageBus(MemoryBroker()) as two:
        got = Collector()
        await two.subscribe("shared.name", got)
        await one.publish(Message(topic="shared.name", payload="lost"))
        await two.publish(Message(topic="shared.name", payload="mine"))
        await got.wait_count(1, 2)
        assert got.payloads == ["mine"]


def test_request_timeout_is_a_timeout_error() -> None:
    assert issubclass(RequestTimeout, TimeoutError)


async def test_retried_message_keeps_its_id_and_counts_attempts() -> None:
    async with AgentMessageBus() as bus:
        seen: list[tuple[str, int]] = []
        done = asyncio.Event()

        async def flaky(msg: Message) -> None:
            seen.append((msg.id, msg.attempt))
            if msg.attempt < 3:
                raise ConnectionResetError("flaky")
            done.set()

        await bus.subscribe("jobs", flaky, retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
        msg = Message(topic="jobs", payload=1)
        await bus.publish(msg)
        await asyncio.wait_for(done.wait(), 2)
        assert seen == [(msg.id, 1), (msg.id, 2), (msg.id, 3)]


async def test_failing_dead_letter_consumer_does_not_loop() -> None:
    async with AgentMessageBus() as bus:
        calls: list[int] = []

        async def always_fails(msg: Message) -> None:
            calls.append(msg.attempt)
            raise RuntimeError("nope")

        policy = RetryPolicy(max_attempts=2, initial_delay=0.01)
        await bus.subscribe("jobs", always_fails, retry=policy, dead_letter_topic="jobs.dlq")
        await bus.subscribe("jobs.dlq", always_fails, retry=policy, dead_letter_topic="jobs.dlq")
        sentinel = Collector()
        await bus.subscribe("jobs.dlq", sentinel)
        await bus.publish(Message(topic="jobs", payload=1))
        await sentinel.wait_count(1, 2)
        await asyncio.sleep(0.2)  # a window in which a loop would show up as more calls
        assert calls == [1, 2, 1, 2]
        assert len(sentinel.messages) == 1


async def test_handler_may_return_a_message_as_reply() -> None:
    async with AgentMessageBus() as bus:
        async def answer(msg: Message) -> Message:
            return Message(topic="ignored", payload="pong", headers={"x-answer": "1"})

        await bus.subscribe("ping", answer)
        reply = await bus.request(Message(topic="ping", payload="ping", correlation_id="c9"),
                                  timeout=2)
        assert (reply.payload, reply.headers["x-answer"], reply.correlation_id) == (
            "pong", "1", "c9")


async def test_reply_without_reply_to_is_refused() -> None:
    async with AgentMessageBus() as bus:
        with pytest.raises(ValueError, match="reply_to"):
            await bus.reply(Message(topic="a", payload=1), "x")


async def test_request_timeout_is_raised_on_time() -> None:
    async with AgentMessageBus() as bus:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await bus.request(Message(topic="nobody.home", payload=1), timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 1.0


async def test_close_fails_pending_requests() -> None:
    bus = AgentMessageBus()
    await bus.connect()
    await bus.subscribe("slow", lambda m: asyncio.sleep(10))
    pending = asyncio.ensure_future(bus.request(Message(topic="slow", payload=1), timeout=10))
    await asyncio.sleep(0.05)
    await bus.close(timeout=0.1)
    with pytest.raises(NotConnected):
        await pending


async def test_slow_subscriber_blocks_publisher_with_bounded_memory() -> None:
    broker = MemoryBroker(buffer_size=5)
    async with AgentMessageBus(broker) as bus:
        release = asyncio.Event()

        async def stuck(msg: Message) -> None:
            await release.wait()

        await bus.subscribe("firehose", stuck)
        published = 0

        async def produce() -> None:
            nonlocal published
            for i in range(100):
                await bus.publish(Message(topic="firehose", payload=i))
                published += 1

        producer = asyncio.ensure_future(produce())
        await asyncio.sleep(0.1)
        assert not producer.done()
        assert published <= 5 + 1 + 1  # buffer + the one in the handler + the one waiting
        release.set()
        await asyncio.wait_for(producer, 2)
        assert published == 100


async def test_idle_bus_uses_no_cpu() -> None:
    async with AgentMessageBus() as bus:
        for i in range(200):
            await bus.subscribe(f"idle.topic{i}", Collector())
            await bus.subscribe(f"idle.group{i}", Collector(), consumer_group="g")
        await asyncio.sleep(0.05)
        cpu_before = time.process_time()
        await asyncio.sleep(1.0)
        assert time.process_time() - cpu_before < 0.05


async def test_replay_since_position_time_and_float_and_bounded_log() -> None:
    async with AgentMessageBus(MemoryBroker(log_size=3)) as bus:
        sent = []
        for i in range(5):
            sent.append(Message(topic="audit.e", payload=i))
            await bus.publish(sent[-1])
        kept = [m async for m in bus.replay("audit.e")]
        assert [m.payload for m in kept] == [2, 3, 4]
        assert [m.payload async for m in bus.replay("audit.e", since=kept[1].position)] == [3, 4]
        when = sent[4].timestamp
        assert [m.payload async for m in bus.replay("audit.e", since=when)] == [4]
        moment = datetime.fromtimestamp(when, timezone.utc)
        assert [m.payload async for m in bus.replay("audit.>", since=moment)] == [4]


def test_every_adapter_imports_and_constructs_without_io() -> None:
    brokers = [
        RedisBroker(url="redis://:s3cret@localhost:1/0", dead_letter_queue="dlq:x"),
        KafkaBroker(bootstrap_servers="localhost:1"),
        NATSBroker(servers=["nats://user:s3cret@localhost:1"], use_jetstream=True),
        RabbitMQBroker(url="amqp://guest:s3cret@localhost:1/"),
        AzureServiceBusBroker(connection_string="Endpoint=sb://x/;SharedAccessKeyName=k;"
                              "SharedAccessKey=s3cret", topic_name="t"),
        AWSSQSBroker(region_name="eu-west-1", queue_name="q", use_fifo=True,
                     endpoint_url="http://127.0.0.1:1"),
    ]
    for broker in brokers:
        assert "s3cret" not in repr(broker)


@pytest.mark.parametrize("url,kind", [
    ("memory://", MemoryBroker),
    ("redis://localhost:6379/0", RedisBroker),
    ("rediss://user:pw@localhost:6380/0", RedisBroker),
    ("nats://localhost:4222", NATSBroker),
    ("amqp://guest:guest@localhost:5672/", RabbitMQBroker),
    ("amqps://guest:guest@localhost:5671/vhost", RabbitMQBroker),
    ("kafka://localhost:9092", KafkaBroker),
    ("sqs://eu-west-1/jobs?fifo=true", AWSSQSBroker),
    ("azuresb://Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v", AzureServiceBusBroker),
])
def test_broker_from_url(url: str, kind: type) -> None:
    assert isinstance(broker_from_url(url), kind)
    assert isinstance(AgentMessageBus.from_url(url).broker, kind)


def test_unknown_scheme_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError) as info:
        broker_from_url("mqtt://user:hunter2@localhost")
    assert "hunter2" not in str(info.value)


async def test_invalid_subscribe_options() -> None:
    async with AgentMessageBus() as bus:
        with pytest.raises(ValueError):
            await bus.subscribe("a", Collector(), max_concurrency=0)
        with pytest.raises(ValueError):
            await bus.subscribe("a", Collector(), dead_letter_topic="bad..topic")
        with pytest.raises(TypeError):
            await bus.subscribe("a", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_message_copy_changes_fields_and_owns_its_headers() -> None:
    original = Message(topic="a", payload={"x": 1}, headers={"h": "1"}, correlation_id="c")
    original.position = 7
    clone = original.copy(topic="b", attempt=3)
    assert (clone.topic, clone.attempt, clone.position) == ("b", 3, 7)
    assert (clone.id, clone.timestamp, clone.correlation_id) == (
        original.id, original.timestamp, "c")
    clone.headers["h"] = "2"
    assert original.headers == {"h": "1"} and original.topic == "a" and original.attempt == 1
    with pytest.raises(TypeError):
        original.copy(nope=1)


async def test_the_same_message_requested_twice_at_once_gets_two_replies() -> None:
    async with AgentMessageBus(observer=False) as bus:
        async def echo(msg: Message) -> object:
            await asyncio.sleep(0.01)
            return msg.payload

        await bus.subscribe("twice", echo, max_concurrency=2)
        request = Message(topic="twice", payload="same")
        replies = await asyncio.gather(bus.request(request, timeout=5),
                                       bus.request(request, timeout=5))
        assert [r.payload for r in replies] == ["same", "same"]


async def test_memory_group_shares_the_load_when_handlers_never_await() -> None:
    """Issue 11: 20 messages to 4 members whose handlers never suspend went 20/0/0/0."""
    async with AgentMessageBus(observer=False) as bus:
        counts = [0, 0, 0, 0]
        done = asyncio.Event()

        def member(index: int) -> Callable[[Message], Awaitable[None]]:
            async def handle(msg: Message) -> None:
                counts[index] += 1  # never awaits
                if sum(counts) == 20:
                    done.set()
            return handle

        for index in range(4):
            await bus.subscribe("shared.work", member(index), consumer_group="g")
        for i in range(20):
            await bus.publish(Message(topic="shared.work", payload=i))
        await asyncio.wait_for(done.wait(), 5)
        assert sum(counts) == 20
        assert min(counts) >= 3, counts


async def test_messages_of_one_key_keep_their_order_under_concurrency() -> None:
    async with AgentMessageBus(observer=False) as bus:
        seen: dict[str, list[int]] = {"a": [], "b": []}
        unkeyed: list[int] = []
        done = asyncio.Event()

        async def handle(msg: Message) -> None:
            await asyncio.sleep(0.002 if msg.payload % 2 else 0.0)  # odd ones are slower
            (seen[msg.key] if msg.key else unkeyed).append(msg.payload)
            if sum(map(len, seen.values())) + len(unkeyed) == 60:
                done.set()

        await bus.subscribe("keyed", handle, max_concurrency=8)
        for n in range(20):
            for key in ("a", "b", None):
                await bus.publish(Message(topic="keyed", payload=n, key=key))
        await asyncio.wait_for(done.wait(), 5)
        assert seen == {"a": list(range(20)), "b": list(range(20))}
        assert sorted(unkeyed) == list(range(20)) and unkeyed != list(range(20)), \
            "without a key, concurrency reorders (the test's handler makes sure)"

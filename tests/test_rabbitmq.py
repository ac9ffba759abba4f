"""RabbitMQ-specific behaviour beyond the contract suite (real broker on 127.0.0.1:5672)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from tests.conftest import require_server
from tests.test_contract_rabbitmq import EXCHANGE, HOST, PORT, URL, test_broker

from amb_core import AgentMessageBus, Message
from amb_core.adapters import RabbitMQBroker, broker_from_url
from amb_core.adapters.rabbitmq import binding_key
from amb_core.adapters.rabbitmq.naming import QUEUE_NAME
from amb_core.errors import BrokerConnectionError, NoResponders, UnsupportedFeature
from amb_core.runtime import ReconnectPolicy


@pytest.fixture
async def bus() -> Any:
    require_server("rabbitmq", HOST, PORT)
    bus = AgentMessageBus(broker=test_broker())
    await bus.connect()
    yield bus
    await bus.close(timeout=2.0)


@pytest.fixture
def topic() -> str:
    return f"rt.{uuid.uuid4().hex[:12]}"


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout


# --- no I/O --------------------------------------------------------------------------------------


def test_binding_keys_map_one_or_more_to_star_hash() -> None:
    assert binding_key("a.b") == "a.b"
    assert binding_key("a.*.c") == "a.*.c"
    assert binding_key("a.>") == "a.*.#"
    assert binding_key(">") == "*.#"
    assert binding_key("a.*.>") == "a.*.*.#"
    with pytest.raises(ValueError, match="'#'"):
        binding_key("a.#")


def test_from_url_options_and_masked_repr() -> None:
    broker = broker_from_url(
        "amqps://agent:s3cret@rabbit:5671/prod?exchange=events&queue_type=classic&confirms=0"
        "&heartbeat=30"
    )
    assert isinstance(broker, RabbitMQBroker)
    assert (broker.exchange, broker.queue_type, broker.confirms) == ("events", "classic", False)
    assert broker.url == "amqps://agent:s3cret@rabbit:5671/prod?heartbeat=30"
    assert "s3cret" not in repr(broker)
    assert RabbitMQBroker().confirms is True and RabbitMQBroker().queue_type == "quorum"
    with pytest.raises(ValueError):
        RabbitMQBroker(queue_type="stream")
    with pytest.raises(ValueError):
        RabbitMQBroker(queue_type="classic", delivery_limit=3)


def test_group_queue_names_fit_amqp_limits() -> None:
    broker = RabbitMQBroker()
    assert broker.group_queue_name("workers", "orders.created") == "amb:workers:orders.created"
    long_name = broker.group_queue_name("g" * 200, "é." * 120 + "x")
    assert len(long_name.encode()) <= 255 and QUEUE_NAME.match(long_name)
    assert long_name != broker.group_queue_name("g" * 200, "é." * 120 + "y")


def test_group_queue_names_on_wildcards_are_valid_readable_and_unique() -> None:
    """A '*' or '>' in a queue name made pamqp refuse the declaration ('Invalid value for
    queue'): a group on a wildcard pattern could not subscribe (issue 11, item 2)."""
    broker = RabbitMQBroker()
    star = broker.group_queue_name("g", "events.user.*")
    tail = broker.group_queue_name("g", "events.>")
    assert star.startswith("amb:g:events.user._star_:") and tail.startswith("amb:g:events._tail_:")
    patterns = ["events.user.*", "events.user._star_", "events.>", "events._tail_", "events.*",
                "*.>", "a.*.>", "événements.*", "a#b.*", "a@23b.*", "a@b.*", "x" * 250 + ".*"]
    names = {broker.group_queue_name("g", pattern) for pattern in patterns}
    assert len(names) == len(patterns)
    names |= {broker.group_queue_name("é" * 100, pattern) for pattern in patterns}
    assert len(names) == 2 * len(patterns)
    for name in names:
        assert QUEUE_NAME.match(name), name
        assert len(name.encode()) <= 255, name
        assert "#" not in name  # reserved for the adapter's own queues
    keeper = broker.keeper_queue_name("amb.dead-letter")
    assert keeper == "amb:#dead-letters:amb.dead-letter"
    assert keeper != broker.group_queue_name("#dead-letters", "amb.dead-letter")
    assert QUEUE_NAME.match(broker.keeper_queue_name("dlq.événements"))
    with pytest.raises(ValueError):
        RabbitMQBroker(queue_prefix="amb*")


async def test_connect_refused_is_a_connection_error_within_the_timeout() -> None:
    broker = RabbitMQBroker(url="amqp://guest:s3cret@127.0.0.1:1/",
                            reconnect=ReconnectPolicy(connect_timeout=2.0))
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        await AgentMessageBus(broker=broker).connect()
    assert time.monotonic() - started < 4.0
    assert isinstance(info.value, ConnectionError)
    assert "s3cret" not in str(info.value)


async def test_a_publish_cancelled_by_its_closed_channel_is_a_connection_error() -> None:
    """Older aiormq cancels the confirmations of a channel that closes: in a task nobody
    cancelled that is a lost channel (BrokerConnectionError, which callers retry), while a
    real cancellation of the publishing task stays a CancelledError."""

    class Closed:
        is_closed = True

    async def publishing() -> None:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError:
            RabbitMQBroker._lost_channel(Closed(), "publish")  # type: ignore[arg-type]
            raise

    if sys.version_info >= (3, 11):  # 3.10 has no Task.cancelling: it stays a cancellation
        with pytest.raises(BrokerConnectionError, match="channel closed"):
            await asyncio.ensure_future(publishing())
    else:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(publishing())

    started = asyncio.Event()

    async def cancelled() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            RabbitMQBroker._lost_channel(Closed(), "publish")  # type: ignore[arg-type]
            raise

    task = asyncio.ensure_future(cancelled())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- real broker ---------------------------------------------------------------------------------


async def test_rabbitmq_version_is_what_the_docs_say() -> None:
    require_server("rabbitmq", HOST, PORT)
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        version = connection.server_properties["version"]
    finally:
        await connection.close()
    assert str(version).startswith("3.")


async def test_tail_wildcard_needs_at_least_one_segment(bus: AgentMessageBus, topic: str) -> None:
    got: list[str] = []
    done = asyncio.Event()

    async def collect(msg: Message) -> None:
        got.append(msg.topic)
        if msg.payload == "last":
            done.set()

    await bus.subscribe(f"{topic}.>", collect)
    for suffix in ("", ".a", ".a.b.c"):
        await bus.publish(Message(topic=topic + suffix, payload=suffix))
    await bus.publish(Message(topic=f"{topic}.z", payload="last"))
    await asyncio.wait_for(done.wait(), 10)
    assert got == [f"{topic}.a", f"{topic}.a.b.c", f"{topic}.z"]


async def test_wire_format_is_the_cloudevents_amqp_binding(
    bus: AgentMessageBus, topic: str
) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        queue = (await channel.queue_declare("", exclusive=True)).queue
        await channel.queue_bind(queue, EXCHANGE, routing_key=topic)
        received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await channel.basic_consume(queue, received.set_result, no_ack=True)
        sent = Message(topic=topic, payload={"a": 1}, headers={"x-app": "t"}, correlation_id="c1")
        await bus.publish(sent)
        raw = await asyncio.wait_for(received, 10)
    finally:
        await connection.close()
    properties = raw.header.properties
    assert raw.body == b'{"a":1}'
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.message_id == sent.id
    headers = properties.headers
    assert headers["cloudEvents:specversion"] == "1.0"
    assert headers["cloudEvents:id"] == sent.id
    assert headers["cloudEvents:correlationid"] == "c1"
    assert headers["x-app"] == "t"
    assert "content-type" not in headers


async def test_group_queue_is_quorum_with_prefetch_of_max_concurrency(
    bus: AgentMessageBus, topic: str
) -> None:
    await bus.subscribe(topic, lambda msg: None, consumer_group="pf", max_concurrency=7)
    queue = bus.broker.group_queue_name("pf", topic)  # type: ignore[attr-defined]
    queues = rabbitmqctl("list_queues", "name", "type", "durable")
    assert any(line.split() == [queue, "quorum", "true"] for line in queues.splitlines())
    consumers = rabbitmqctl("list_consumers", "queue_name", "prefetch_count")
    assert [queue, "7"] in [line.split() for line in consumers.splitlines()]


async def test_classic_group_queue_option(topic: str) -> None:
    require_server("rabbitmq", HOST, PORT)
    async with AgentMessageBus(broker=test_broker(queue_type="classic")) as bus:
        got: list[Any] = []
        done = asyncio.Event()

        async def handle(msg: Message) -> None:
            got.append(msg.payload)
            if len(got) == 5:
                done.set()

        await bus.subscribe(topic, handle, consumer_group="classic")
        for i in range(5):
            await bus.publish(Message(topic=topic, payload=i))
        await asyncio.wait_for(done.wait(), 10)
        queue = bus.broker.group_queue_name("classic", topic)  # type: ignore[attr-defined]
        queues = rabbitmqctl("list_queues", "name", "type")
        assert [queue, "classic"] in [line.split() for line in queues.splitlines()]
    assert got == [0, 1, 2, 3, 4]


async def test_crash_redelivery_counts_attempts_from_x_delivery_count(topic: str) -> None:
    require_server("rabbitmq", HOST, PORT)
    doomed = AgentMessageBus(broker=test_broker())
    await doomed.connect()
    started = asyncio.Event()

    async def hang(msg: Message) -> None:
        started.set()
        await asyncio.Event().wait()

    await doomed.subscribe(topic, hang, consumer_group="crash")
    await doomed.publish(Message(topic=topic, payload="x"))
    await asyncio.wait_for(started.wait(), 10)
    await doomed.close(timeout=0)
    attempts: list[int] = []
    arrived = asyncio.Event()

    async def survive(msg: Message) -> None:
        attempts.append(msg.attempt)
        arrived.set()

    async with AgentMessageBus(broker=test_broker()) as survivor:
        await survivor.subscribe(topic, survive, consumer_group="crash")
        await asyncio.wait_for(arrived.wait(), 10)
    assert attempts == [2]


async def test_concurrent_publishes_share_confirm_waits(bus: AgentMessageBus, topic: str) -> None:
    broker = bus.broker
    assert isinstance(broker, RabbitMQBroker) and broker.confirms
    channel = broker._publish_channel
    assert channel is not None
    peak = 0

    async def publish(i: int) -> None:
        nonlocal peak
        task = asyncio.ensure_future(bus.publish(Message(topic=topic, payload=i)))
        await asyncio.sleep(0)
        peak = max(peak, len(channel.confirmations))  # type: ignore[attr-defined]
        await task

    await asyncio.gather(*(publish(i) for i in range(200)))
    assert peak > 10, f"publishes waited for each other's confirms (at most {peak} pending)"


async def test_requests_run_concurrently_on_one_bus(bus: AgentMessageBus, topic: str) -> None:
    in_handler = 0
    everyone_in = asyncio.Event()

    async def barrier(msg: Message) -> Any:
        nonlocal in_handler
        in_handler += 1
        if in_handler == 50:
            everyone_in.set()
        await asyncio.wait_for(everyone_in.wait(), 10)  # only if 50 requests are in flight
        return msg.payload * 2

    async with AgentMessageBus(broker=test_broker()) as server:
        await server.subscribe(topic, barrier, max_concurrency=50)
        replies = await asyncio.gather(
            *(bus.request(Message(topic=topic, payload=i), timeout=15) for i in range(50))
        )
    assert sorted(r.payload for r in replies) == [2 * i for i in range(50)]


async def test_request_to_nobody_fails_fast(bus: AgentMessageBus, topic: str) -> None:
    started = time.monotonic()
    with pytest.raises(NoResponders):
        await bus.request(Message(topic=f"{topic}.unbound", payload=1), timeout=10)
    assert time.monotonic() - started < 2.0


async def test_foreign_amqp_rpc_client_gets_its_correlation_id(
    bus: AgentMessageBus, topic: str
) -> None:
    import aiormq
    from pamqp import commands as spec

    async def double(msg: Message) -> Any:
        assert isinstance(msg.payload, bytes)  # a foreign message: the raw body
        return {"twice": int(msg.payload) * 2}

    await bus.subscribe(topic, double)
    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        reply_queue = (await channel.queue_declare("", exclusive=True)).queue
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await channel.basic_consume(reply_queue, reply.set_result, no_ack=True)
        await channel.basic_publish(
            b"21", exchange=EXCHANGE, routing_key=topic,
            properties=spec.Basic.Properties(reply_to=reply_queue, correlation_id="mine-7",
                                             content_type="application/json"),
        )
        answer = await asyncio.wait_for(reply, 10)
    finally:
        await connection.close()
    assert answer.header.properties.correlation_id == "mine-7"
    assert answer.body == b'{"twice":42}'


async def test_replay_is_unsupported(bus: AgentMessageBus, topic: str) -> None:
    with pytest.raises(UnsupportedFeature):
        async for _ in bus.replay(topic):
            pass


async def test_delivery_limit_dead_letters_through_the_exchange(topic: str) -> None:
    """A message whose consumers keep dying (no exception the bus could catch) is dead-lettered
    by the quorum queue's delivery limit, through the exchange to the default dead-letter topic."""
    require_server("rabbitmq", HOST, PORT)
    broker = test_broker(delivery_limit=1)
    queue = broker.group_queue_name("lim", topic)
    async with AgentMessageBus(broker=broker) as bus:
        dead: list[Message] = []
        arrived = asyncio.Event()

        async def collect(msg: Message) -> None:
            if msg.headers.get("x-first-death-queue") == queue:
                dead.append(msg)
                arrived.set()

        await bus.subscribe(broker.default_dead_letter_topic, collect)
        crashes = 0
        for _ in range(4):
            crasher = AgentMessageBus(broker=test_broker(delivery_limit=1))
            await crasher.connect()
            started = asyncio.Event()

            async def hang(msg: Message, started: asyncio.Event = started) -> None:
                started.set()
                await asyncio.Event().wait()

            await crasher.subscribe(topic, hang, consumer_group="lim")
            if crashes == 0:
                await bus.publish(Message(topic=topic, payload="crashy"))
            try:
                await asyncio.wait_for(started.wait(), 3)
            except asyncio.TimeoutError:
                await crasher.close()
                break
            crashes += 1
            await crasher.close(timeout=0)  # dies holding the message
        await asyncio.wait_for(arrived.wait(), 10)
    assert crashes == 2  # the first delivery and one redelivery; then the limit of 1 hit
    assert dead[0].payload == "crashy"
    assert dead[0].headers["x-first-death-reason"] == "delivery_limit"


# --- acknowledgements (regressions: a bad basic.ack closes the channel and loses the queue) -----


def _unacked(queue: str) -> int | None:
    for line in rabbitmqctl("list_queues", "name", "messages_unacknowledged").splitlines():
        fields = line.split()
        if fields[:1] == [queue]:
            return int(fields[1])
    return None  # gone: an auto-delete queue loses its consumer when its channel is closed


async def _until_unacked(queue: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _unacked(queue)) != count:
        assert time.monotonic() < deadline, f"{queue}: {seen} unacknowledged, expected {count}"
        await asyncio.sleep(0.1)  # polling the broker's own view, not synchronising with it


async def test_out_of_order_acks_never_repeat_a_tag_in_a_multiple_ack(
    bus: AgentMessageBus, topic: str
) -> None:
    """Tag 2 is acked alone (tag 1 still running); then tag 1 completes the run 1..2. Acking
    that run as ``multiple`` up to tag 2 named an already-acknowledged tag: RabbitMQ closed the
    channel (PRECONDITION_FAILED - unknown delivery tag 2), the exclusive queue went with it and
    every later message was lost."""
    release = asyncio.Event()
    second_done = asyncio.Event()
    got: list[Any] = []
    third = asyncio.Event()

    async def handle(msg: Message) -> None:
        if msg.payload == 0:
            await release.wait()
        got.append(msg.payload)
        if msg.payload == 1:
            second_done.set()
        if msg.payload == 2:
            third.set()

    sub = await bus.subscribe(topic, handle, max_concurrency=2)
    assert sub._broker_sub is not None
    queue = sub._broker_sub.queue  # type: ignore[attr-defined]
    await bus.publish(Message(topic=topic, payload=0))
    await bus.publish(Message(topic=topic, payload=1))
    await asyncio.wait_for(second_done.wait(), 10)
    await _until_unacked(queue, 1)  # the broker has the ack of message 1 (tag 2) alone
    release.set()
    await _until_unacked(queue, 0)
    await bus.publish(Message(topic=topic, payload=2))
    await asyncio.wait_for(third.wait(), 10)
    assert got == [1, 0, 2]
    await _until_unacked(queue, 0)


async def test_acks_of_a_channel_are_written_in_order_when_the_write_queue_is_full(
    bus: AgentMessageBus,
) -> None:
    """aiormq's write queue holds 10 frames; concurrent publishers keep it full. An ack frame
    that had to wait for room must not be overtaken by the next turn's ack: a ``multiple`` ack
    of tag 1 arriving after one of tag 2 names an unknown tag and kills the channel."""
    import aiormq
    from pamqp import frame as pamqp_frame

    from amb_core.adapters.rabbitmq.subscriptions import ack_sender
    from amb_core.runtime import AckBatcher

    broker = bus.broker
    assert isinstance(broker, RabbitMQBroker) and broker._connection is not None
    if not broker.fast_path_on:
        pytest.skip("this aiormq is not on the fast path's allow-list (the public acks are used)")
    channel = await broker._connection.channel()
    writer: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)  # stands in for aiormq's writer
    channel.write_queue = writer  # type: ignore[misc]
    try:
        acks: AckBatcher[int] = AckBatcher(ack_sender(channel, True), name="test")
        writer.put_nowait("filler")  # the writer is behind: no room
        acks.add(1)
        await asyncio.sleep(0)  # end of the turn: tag 1 waits for room
        assert writer.get_nowait() == "filler"  # the writer catches up: room for one frame
        acks.add(2)
        await asyncio.sleep(0)  # a later turn's ack
        sent: list[tuple[int, bool]] = []
        while len(sent) < 2:
            frame = await asyncio.wait_for(writer.get(), 5)
            payload = frame.payload
            while payload:
                used, _, method = pamqp_frame.unmarshal(payload)
                payload = payload[used:]
                assert isinstance(method, aiormq.spec.Basic.Ack)
                sent.append((method.delivery_tag, method.multiple))
        assert [tag for tag, _ in sent] == [1, 2], sent
        await asyncio.wait_for(acks.flush(), 5)
    finally:
        channel.write_queue = broker._connection.write_queue  # type: ignore[misc]
        await channel.close()


# --- the fast path, reply addresses, dead letters, groups ---------------------------------------


async def test_fast_path_is_on_for_the_tested_aiormq_and_off_when_asked() -> None:
    require_server("rabbitmq", HOST, PORT)
    from amb_core.adapters.rabbitmq import _fast

    for wanted in (True, False):
        broker = test_broker(fast_path=wanted)
        await broker.connect()
        try:
            assert broker.fast_path_on is (wanted and _fast.enabled(True))
        finally:
            await broker.close()


async def test_reply_addresses_are_opaque(bus: AgentMessageBus, topic: str) -> None:
    """The serving side sees the request's own reply_to (no correlation id packed after a
    space); the reply still finds its request through the envelope's causation id."""
    seen: list[str | None] = []

    async def echo(msg: Message) -> Any:
        seen.append(msg.reply_to)
        return msg.payload

    async with AgentMessageBus(broker=test_broker()) as server:
        await server.subscribe(topic, echo)
        reply = await bus.request(Message(topic=topic, payload="hi"), timeout=10)
    assert reply.payload == "hi"
    assert seen and seen[0] is not None
    assert seen[0].startswith("amq.rabbitmq.reply-to") and " " not in seen[0]


async def _letters(broker: RabbitMQBroker, topic: str) -> list[Any]:
    return [(d.body, d.position) async for d in broker.dead_letters(topic)]


async def test_kept_dead_letters_are_listed_in_place_and_removed_exactly(topic: str) -> None:
    require_server("rabbitmq", HOST, PORT)
    broker = test_broker()
    await broker.connect()
    dlq = f"{topic}.dlq"
    try:
        assert await _letters(broker, dlq) == []  # never kept: nothing, no error
        await broker.keep_dead_letters(dlq)
        keeper = broker.keeper_queue_name(dlq)
        for i in range(5):
            await broker.publish(dlq, f"letter {i}".encode(), {"cloudEvents:id": f"id-{i}"})
        deadline = time.monotonic() + 10
        while len(first := await _letters(broker, dlq)) < 5:
            assert time.monotonic() < deadline, first
            await asyncio.sleep(0.05)
        assert first == [(f"letter {i}".encode(), f"id-{i}") for i in range(5)]
        assert await _letters(broker, dlq) == first  # listing removes nothing, keeps the order
        assert await broker.remove_dead_letters(dlq, ["id-1", "id-3", "id-9"]) == 2
        assert [p for _, p in await _letters(broker, dlq)] == ["id-0", "id-2", "id-4"]

        got: list[Any] = []
        done = asyncio.Event()

        async def take(delivery: Any) -> None:
            got.append((delivery.body, delivery.delivery_count))
            await delivery.ack()
            if len(got) == 3:
                done.set()

        sub = await broker.subscribe(dlq, take, group="operators")
        assert sub.queue == keeper  # type: ignore[attr-defined]
        await asyncio.wait_for(done.wait(), 10)
        # oldest first; listing the letters is not an attempt of theirs
        assert got == [(b"letter 0", None), (b"letter 2", None), (b"letter 4", None)]
    finally:
        await broker.close()
    assert keeper in rabbitmqctl("list_queues", "name").split("\n")


async def test_delete_group_removes_its_queue_and_what_waits_in_it(topic: str) -> None:
    require_server("rabbitmq", HOST, PORT)
    broker = test_broker()
    await broker.connect()
    try:
        pattern = f"{topic}.*"
        queue = broker.group_queue_name("doomed", pattern)
        sub = await broker.subscribe(pattern, lambda d: d.ack(), group="doomed")
        await sub.close()
        await broker.publish(f"{topic}.x", b"waiting", {})
        assert queue in rabbitmqctl("list_queues", "name").split("\n")
        await broker.delete_group(pattern, "doomed")
        assert queue not in rabbitmqctl("list_queues", "name").split("\n")
        await broker.delete_group(pattern, "doomed")  # gone already: no error
    finally:
        await broker.close()

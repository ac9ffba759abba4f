"""RedisBroker specifics beyond the contract: routing on one pub/sub connection, glob versus
segment wildcards, timeouts longer than the socket timeout, delivery counts, trimming, replay
positions, URL handling and idleness. Real servers only (the shared one, or a private one)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from tests.conftest import require_server
from tests.servers import PrivateRedis, free_port
from tests.test_contract_redis import HOST, PORT, URL

from amb_core import AgentMessageBus, BrokerConnectionError, Message, RetryPolicy
from amb_core.adapters import RedisBroker, broker_from_url
from amb_core.retry import ATTEMPTS
from amb_core.testing.contract import Collector


@pytest.fixture
def topic() -> str:
    return f"rt.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw() -> AsyncIterator[redis.Redis]:
    require_server("redis", HOST, PORT)
    client = redis.Redis.from_url(URL)
    yield client
    await client.aclose()


@pytest.fixture
async def bus(raw: redis.Redis, topic: str) -> AsyncIterator[AgentMessageBus]:
    bus = AgentMessageBus(broker=RedisBroker(URL, claim_idle=1.0))
    await bus.connect()
    yield bus
    await bus.close(timeout=2.0)
    async for key in raw.scan_iter(match=f"{topic}*"):
        await raw.delete(key)


async def test_several_subscriptions_one_reader_each_gets_its_own(
    bus: AgentMessageBus, raw: redis.Redis, topic: str
) -> None:
    a1, a2, b, star = Collector(), Collector(), Collector(), Collector()
    await bus.subscribe(f"{topic}.a", a1)
    await bus.subscribe(f"{topic}.a", a2)
    await bus.subscribe(f"{topic}.b", b)
    await bus.subscribe(f"{topic}.*", star)
    for i in range(20):
        await bus.publish(Message(topic=f"{topic}.a", payload=("a", i)))
        await bus.publish(Message(topic=f"{topic}.b", payload=("b", i)))
    for collector, count in ((a1, 20), (a2, 20), (b, 20), (star, 40)):
        await collector.wait_count(count, 10)
    await asyncio.sleep(0.1)
    assert a1.payloads == a2.payloads == [["a", i] for i in range(20)]
    assert b.payloads == [["b", i] for i in range(20)]
    assert len(star.payloads) == 40
    # One pub/sub connection for the whole broker: Redis sees one subscriber per channel.
    counts = dict(await raw.pubsub_numsub(f"{topic}.a", f"{topic}.b"))
    assert counts == {f"{topic}.a".encode(): 1, f"{topic}.b".encode(): 1}


async def test_a_slow_subscription_does_not_stall_the_others(
    bus: AgentMessageBus, topic: str
) -> None:
    release = asyncio.Event()
    fast = Collector()

    async def stuck(msg: Message) -> None:
        await release.wait()

    await bus.subscribe(topic, stuck)
    await bus.subscribe(topic, fast)
    for i in range(50):
        await bus.publish(Message(topic=topic, payload=i))
    await fast.wait_count(50, 10)
    release.set()


async def test_wildcards_are_segment_exact_unlike_psubscribe_globs(
    bus: AgentMessageBus, raw: redis.Redis, topic: str
) -> None:
    glob = raw.pubsub()
    await glob.psubscribe(f"{topic}.events.*")
    star, tail = Collector(), Collector()
    await bus.subscribe(f"{topic}.events.*", star)
    await bus.subscribe(f"{topic}.events.>", tail)
    for suffix in ("events.a", "events.a.b", "events.a.b.c"):
        await bus.publish(Message(topic=f"{topic}.{suffix}", payload=suffix))
    await tail.wait_count(3, 10)
    # Redis's own glob matches across dots ...
    seen: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        message = await glob.get_message(timeout=1.0)
        if message and message["type"] == "pmessage":
            seen.append(message["channel"])
    assert len(seen) == 3
    # ... amb's '*' matches exactly one segment.
    assert star.payloads == ["events.a"]
    assert tail.payloads == ["events.a", "events.a.b", "events.a.b.c"]
    await glob.aclose()


async def test_glob_characters_in_topics_are_literal(bus: AgentMessageBus, topic: str) -> None:
    got = Collector()
    await bus.subscribe(f"{topic}.x[1]?.*", got)
    await bus.publish(Message(topic=f"{topic}.x1a.y", payload="not me"))
    await bus.publish(Message(topic=f"{topic}.x[1]?.y", payload="me"))
    await got.wait_count(1, 10)
    await asyncio.sleep(0.1)
    assert got.payloads == ["me"]


async def test_request_slower_than_socket_timeout_and_idle_group_reader(
    raw: redis.Redis, topic: str
) -> None:
    """The old amb-core failed every request over redis-py's 5 s socket timeout."""
    server = AgentMessageBus(broker=RedisBroker(URL, socket_timeout=5.0))
    client = AgentMessageBus(broker=RedisBroker(URL, socket_timeout=5.0, block_timeout=2.0))
    await server.connect()
    await client.connect()
    try:
        async def slow(msg: Message) -> str:
            await asyncio.sleep(5.5)
            return "worth the wait"

        idle_group = Collector()
        await server.subscribe(f"{topic}.slow", slow)
        await client.subscribe(f"{topic}.work", idle_group, consumer_group="idle")
        started = time.monotonic()
        reply = await client.request(Message(topic=f"{topic}.slow", payload=1), timeout=15)
        assert reply.payload == "worth the wait"
        assert time.monotonic() - started > 5.0
        # The group reader sat idle for longer than the socket timeout and still works.
        await client.publish(Message(topic=f"{topic}.work", payload="still here"))
        await idle_group.wait_count(1, 5)
        assert idle_group.payloads == ["still here"]
    finally:
        await client.close()
        await server.close()
        await raw.delete(f"{topic}.work")


async def test_redelivery_counts_and_dead_letter_after_crashes(
    raw: redis.Redis, topic: str
) -> None:
    """A member that dies mid-handler: the next one gets the message with Redis's delivery
    count as the attempt; past max_attempts it is dead-lettered with no further call."""
    policy = RetryPolicy(max_attempts=2, initial_delay=0.01)
    attempts: list[int] = []
    for round_ in range(2):
        started = asyncio.Event()
        doomed = AgentMessageBus(broker=RedisBroker(URL, claim_idle=0.5), retry=policy)
        await doomed.connect()

        async def hang(msg: Message, started: asyncio.Event = started) -> None:
            attempts.append(msg.attempt)
            started.set()
            await asyncio.Event().wait()

        await doomed.subscribe(topic, hang, consumer_group="crashy")
        if round_ == 0:
            await doomed.publish(Message(topic=topic, payload="doomed"))
        await asyncio.wait_for(started.wait(), 10)
        await doomed.close(timeout=0)
    assert attempts == [1, 2]
    dlq = f"{topic}.dlq"
    survivor = AgentMessageBus(broker=RedisBroker(URL, claim_idle=0.5), retry=policy)
    await survivor.connect()
    dead, calls = Collector(), Collector()
    try:
        await survivor.subscribe(dlq, dead)

        async def fail(msg: Message) -> None:
            await calls(msg)
            raise RuntimeError("still broken")

        await survivor.subscribe(topic, fail, consumer_group="crashy", dead_letter_topic=dlq)
        await dead.wait_count(1, 10)
        assert dead.messages[0].headers[ATTEMPTS] == "3"
        assert dead.messages[0].payload == "doomed"
        assert [m.attempt for m in calls.messages] == [3]
    finally:
        await survivor.close()
        await raw.delete(topic, dlq)


async def test_stream_is_trimmed_to_maxlen(raw: redis.Redis, topic: str) -> None:
    broker = RedisBroker(URL, stream_maxlen=100, stream_topics=[topic])
    async with AgentMessageBus(broker=broker) as bus:
        await asyncio.gather(*(bus.publish(Message(topic=topic, payload=i)) for i in range(2000)))
        length = await raw.xlen(topic)
        kept = [m.payload async for m in bus.replay(topic)]
    await raw.delete(topic)
    assert 100 <= length < 2000  # approximate trimming: about MAXLEN, never everything
    assert kept[-1] == 1999 and len(kept) == length


async def test_no_stream_unless_a_group_or_stream_topics_ask(
    bus: AgentMessageBus, raw: redis.Redis, topic: str
) -> None:
    await bus.publish(Message(topic=f"{topic}.plain", payload=1))
    assert await raw.exists(f"{topic}.plain") == 0
    got = Collector()
    await bus.subscribe(f"{topic}.work", got, consumer_group="g")
    # A publisher on another broker instance, which never saw the group, still reaches it.
    other = AgentMessageBus(broker=RedisBroker(URL))
    async with other:
        for i in range(3):
            await other.publish(Message(topic=f"{topic}.work", payload=i))
    await got.wait_count(3, 10)
    assert await raw.xlen(f"{topic}.work") == 3


async def test_replay_from_start_id_and_time_and_pattern(
    raw: redis.Redis, topic: str
) -> None:
    broker = RedisBroker(URL, stream_topics=[f"{topic}.>"])
    try:
        await _replay_checks(broker, topic)
    finally:
        await raw.delete(f"{topic}.a", f"{topic}.b")


async def _replay_checks(broker: RedisBroker, topic: str) -> None:
    async with AgentMessageBus(broker=broker) as bus:
        for i in range(3):  # across streams, order is by id: milliseconds apart
            await bus.publish(Message(topic=f"{topic}.a", payload=f"a{i}"))
            await asyncio.sleep(0.003)
            await bus.publish(Message(topic=f"{topic}.b", payload=f"b{i}"))
            await asyncio.sleep(0.003)
        everything = [m async for m in bus.replay(f"{topic}.a")]
        assert [m.payload for m in everything] == ["a0", "a1", "a2"]
        assert isinstance(everything[1].position, str) and "-" in everything[1].position
        since_id = [m.payload async for m in bus.replay(f"{topic}.a", since=everything[1].position)]
        assert since_id == ["a1", "a2"]
        merged = [m.payload async for m in bus.replay(f"{topic}.*")]
        assert merged == ["a0", "b0", "a1", "b1", "a2", "b2"]
        ms = int(everything[2].position.split("-")[0])
        assert [m.payload async for m in bus.replay(f"{topic}.a", since=ms)] == ["a2"]
        with pytest.raises(ValueError):
            [m async for m in bus.replay(f"{topic}.a", since="not-an-id")]


async def test_wildcard_consumer_group_is_refused(bus: AgentMessageBus, topic: str) -> None:
    from amb_core import UnsupportedFeature

    with pytest.raises(UnsupportedFeature):
        await bus.subscribe(f"{topic}.*", Collector(), consumer_group="g")


def test_url_password_never_in_repr() -> None:
    broker = broker_from_url("rediss://agent:s3cret-pw@redis.example:6380/2")
    assert isinstance(broker, RedisBroker)
    assert "s3cret-pw" not in repr(broker)
    assert "***" in repr(broker)
    assert broker.default_dead_letter_topic == "dlq:agent-messages"


async def test_password_url_and_refused_connection(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    await admin.config_set("requirepass", "s3cret-pw")
    await admin.aclose()
    good = f"redis://:s3cret-pw@{HOST}:{private_redis.port}/0"
    async with AgentMessageBus(broker=RedisBroker(good)) as bus:
        got = Collector()
        await bus.subscribe("pw.topic", got)
        await bus.publish(Message(topic="pw.topic", payload="authenticated"))
        await got.wait_count(1, 5)
    with pytest.raises(BrokerConnectionError) as refused:
        await RedisBroker(f"redis://:wrong-pw@{HOST}:{private_redis.port}/0").connect()
    assert "wrong-pw" not in str(refused.value)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await RedisBroker(f"redis://{HOST}:1/0", connect_timeout=1.0).connect()
    assert time.monotonic() - started < 3
    assert "s3cret-pw" not in caplog.text


async def test_idle_means_idle(private_redis: PrivateRedis) -> None:
    """Subscribed but idle: blocking reads, not a polling loop (few commands per second)."""
    broker = RedisBroker(private_redis.url, block_timeout=10.0, claim_idle=30.0)
    async with AgentMessageBus(broker=broker) as bus:
        for i in range(20):
            await bus.subscribe(f"idle.t{i}", Collector())
        await bus.subscribe("idle.work", Collector(), consumer_group="g")
        admin = redis.Redis.from_url(private_redis.url)
        before = (await admin.info("stats"))["total_commands_processed"]
        await asyncio.sleep(2.0)
        after = (await admin.info("stats"))["total_commands_processed"]
        await admin.aclose()
    assert after - before <= 3  # the INFO call itself, nothing else


async def test_streams_lose_nothing_across_a_restart(
    private_redis: PrivateRedis,
) -> None:
    broker = RedisBroker(private_redis.url, claim_idle=1.0)
    async with AgentMessageBus(broker=broker) as bus:
        got = Collector()
        await bus.subscribe("restart.work", got, consumer_group="g")
        for i in range(100):
            await bus.publish(Message(topic="restart.work", payload=i))
        await private_redis.restart()
        sent = 100
        deadline = time.monotonic() + 30
        while sent < 200:
            try:
                await bus.publish(Message(topic="restart.work", payload=sent))
                sent += 1
            except ConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        await got.wait_for(lambda: set(got.payloads) >= set(range(200)), 20)


async def test_rediss_url_with_password_over_real_tls(tmp_path: Path) -> None:
    """``rediss://`` end to end: a private TLS-only redis-server with a password and a self-signed
    certificate; pub/sub and a consumer group both work and the password stays out of repr."""
    redis_server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if redis_server is None or openssl is None:
        pytest.skip("needs redis-server and openssl")
    folder = str(tmp_path)
    cert, key = f"{folder}/cert.pem", f"{folder}/key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - starts at once, never waits
        [redis_server, "--bind", HOST, "--port", "0", "--tls-port", str(port),
         "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert,
         "--tls-auth-clients", "no", "--requirepass", "tls-s3cret", "--save", "",
         "--appendonly", "no", "--dir", folder],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            if server.poll() is not None:
                output = server.stdout.read().decode() if server.stdout else ""
                pytest.skip(f"this redis-server has no TLS: {output[-200:]}")
            try:
                socket.create_connection((HOST, port), 0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        url = f"rediss://:tls-s3cret@{HOST}:{port}/0?ssl_ca_certs={cert}"
        broker = RedisBroker(url)
        assert "tls-s3cret" not in repr(broker)
        async with AgentMessageBus(broker=broker) as bus:
            plain, grouped = Collector(), Collector()
            await bus.subscribe("tls.plain", plain)
            await bus.subscribe("tls.work", grouped, consumer_group="g")
            await bus.publish(Message(topic="tls.plain", payload={"secure": True}))
            await bus.publish(Message(topic="tls.work", payload="job"))
            await plain.wait_count(1, 10)
            await grouped.wait_count(1, 10)
            assert plain.payloads == [{"secure": True}] and grouped.payloads == ["job"]
        with pytest.raises(ConnectionError):  # plain TCP to a TLS-only port fails, clearly
            await RedisBroker(f"redis://:tls-s3cret@{HOST}:{port}/0", connect_timeout=2.0).connect()
    finally:
        server.kill()
        server.wait(5)

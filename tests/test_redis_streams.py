"""RedisBroker's Streams beyond the contract: leases of slow handlers, kept dead letters seen
from other processes, deleting a group, and replay of a topic Redis did not keep. Real server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from tests.conftest import require_server
from tests.test_contract_redis import HOST, PORT, URL

from amb_core import AgentMessageBus, Message, UnsupportedFeature
from amb_core.adapters import RedisBroker
from amb_core.adapters.redis.broker import KEPT_REGISTRY
from amb_core.testing.contract import Collector


@pytest.fixture
def topic() -> str:
    return f"rs.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(topic: str) -> AsyncIterator[redis.Redis]:
    require_server("redis", HOST, PORT)
    client = redis.Redis.from_url(URL)
    yield client
    async for key in client.scan_iter(match=f"{topic}*"):
        await client.delete(key)
    async for member in client.sscan_iter(KEPT_REGISTRY, match=f"{topic}*"):
        await client.srem(KEPT_REGISTRY, member)
    await client.aclose()


async def test_a_handler_slower_than_claim_idle_keeps_its_message(
    raw: redis.Redis, topic: str
) -> None:
    """The member running a handler for 3.5 x claim_idle renews the entry's idle time, so the
    second member, checking for orphans every claim_idle / 2, never takes it over."""
    claim_idle = 1.0
    slow_bus = AgentMessageBus(broker=RedisBroker(URL, claim_idle=claim_idle))
    other_bus = AgentMessageBus(broker=RedisBroker(URL, claim_idle=claim_idle))
    await slow_bus.connect()
    await other_bus.connect()
    started, done = asyncio.Event(), asyncio.Event()
    attempts: list[int] = []

    async def slow(msg: Message) -> None:
        attempts.append(msg.attempt)
        started.set()
        await asyncio.sleep(claim_idle * 3.5)
        done.set()

    other = Collector()
    try:
        await slow_bus.subscribe(topic, slow, consumer_group="g")
        await slow_bus.publish(Message(topic=topic, payload="slow"))
        await asyncio.wait_for(started.wait(), 10)
        await other_bus.subscribe(topic, other, consumer_group="g")
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(claim_idle)  # a window for a late take-over to show up
        assert other.payloads == [], "another member took over a message still being handled"
        assert attempts == [1]
        deadline = asyncio.get_running_loop().time() + 5
        while (await raw.xpending(topic, "g"))["pending"]:
            assert asyncio.get_running_loop().time() < deadline, "the slow message was not acked"
            await asyncio.sleep(0.05)
        member = next(iter(slow_bus.broker._members))  # type: ignore[attr-defined]
        assert member.leases.renewals >= 2
    finally:
        await other_bus.close(timeout=2.0)
        await slow_bus.close(timeout=2.0)


async def test_a_dead_member_s_message_is_still_taken_over(raw: redis.Redis, topic: str) -> None:
    """Leases are renewed only by the member holding them: an entry read by a member that
    then went silent (a raw consumer here, which never renews) is taken over after
    claim_idle, with Redis's delivery count."""
    await raw.xgroup_create(topic, "g", id="$", mkstream=True)
    survivor = AgentMessageBus(broker=RedisBroker(URL, claim_idle=0.6))
    async with survivor:
        await survivor.publish(Message(topic=topic, payload="orphan"))
        taken = await raw.xreadgroup("g", "ghost", {topic: ">"}, count=10)
        assert len(taken[0][1]) == 1
        received = Collector()
        await survivor.subscribe(topic, received, consumer_group="g")
        await received.wait_count(1, 10)
        assert received.payloads == ["orphan"] and received.messages[0].attempt == 2


async def test_kept_dead_letters_across_brokers(raw: redis.Redis, topic: str) -> None:
    """keep_dead_letters makes the stream at once, so a publisher that never heard of it
    appends too; a group made later by another broker starts at the oldest letter; letters
    are listed with their stream ids and removed by them."""
    dlq = f"{topic}.dlq"
    keeper = RedisBroker(URL)
    stranger = RedisBroker(URL)
    reader = RedisBroker(URL)
    for broker in (keeper, stranger, reader):
        await broker.connect()
    try:
        await keeper.keep_dead_letters(dlq)
        assert await raw.exists(dlq) == 1 and await raw.xlen(dlq) == 0
        assert await raw.sismember(KEPT_REGISTRY, dlq)
        await stranger.publish(dlq, b"from a stranger", {})
        await keeper.publish(dlq, b"from the keeper", {})
        letters = [d async for d in keeper.dead_letters(dlq)]
        assert [d.body for d in letters] == [b"from a stranger", b"from the keeper"]
        assert all(isinstance(d.position, str) and "-" in d.position for d in letters)

        seen: list[bytes] = []
        both = asyncio.Event()

        async def take(delivery: object) -> None:
            seen.append(delivery.body)  # type: ignore[attr-defined]
            await delivery.ack()  # type: ignore[attr-defined]
            if len(seen) == 2:
                both.set()

        await reader.subscribe(dlq, take, group="operators")
        await asyncio.wait_for(both.wait(), 10)
        assert seen == [b"from a stranger", b"from the keeper"]

        positions = [d.position for d in letters if d.position is not None]
        assert await keeper.remove_dead_letters(dlq, positions[:1]) == 1
        assert await keeper.remove_dead_letters(dlq, positions[:1]) == 0
        assert [d.body async for d in keeper.dead_letters(dlq)] == [b"from the keeper"]
        assert await keeper.remove_dead_letters(dlq, []) == 0
    finally:
        for broker in (reader, stranger, keeper):
            await broker.close()


async def test_a_group_on_a_plain_stream_topic_starts_at_the_end(
    raw: redis.Redis, topic: str
) -> None:
    """Only kept dead-letter topics start new groups at 0; a stream_topics topic keeps the
    documented start at '$' (what is published from then on)."""
    broker = RedisBroker(URL, stream_topics=[topic])
    async with AgentMessageBus(broker=broker) as bus:
        await bus.publish(Message(topic=topic, payload="before"))
        got = Collector()
        await bus.subscribe(topic, got, consumer_group="late")
        await bus.publish(Message(topic=topic, payload="after"))
        await got.wait_count(1, 10)
        await asyncio.sleep(0.2)
        assert got.payloads == ["after"]


async def test_delete_group(raw: redis.Redis, topic: str) -> None:
    broker = RedisBroker(URL)
    await broker.connect()
    try:
        got = asyncio.Event()

        async def take(delivery: object) -> None:
            got.set()

        await broker.subscribe(topic, take, group="doomed")
        await broker.subscribe(topic, take, group="kept")
        await broker.publish(topic, b"unacked", {})
        await asyncio.wait_for(got.wait(), 10)
        assert {g["name"] for g in await raw.xinfo_groups(topic)} == {b"doomed", b"kept"}
        await broker.delete_group(topic, "doomed")
        # The local member stopped (else its next read would re-create the group).
        await asyncio.sleep(0.3)
        assert {g["name"] for g in await raw.xinfo_groups(topic)} == {b"kept"}
        assert await raw.exists(topic) == 1  # the stream stays
        await broker.delete_group(topic, "never-existed")  # nothing to delete: no error
        await broker.delete_group(f"{topic}.nowhere", "g")  # no stream at all: no error
        with pytest.raises(UnsupportedFeature):
            await broker.delete_group(f"{topic}.*", "doomed")
    finally:
        await broker.close()


async def test_replay_of_a_topic_without_a_stream_says_why(
    raw: redis.Redis, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11, item 4: a replay that returns nothing because Redis kept nothing says so."""
    broker = RedisBroker(URL, stream_topics=[f"{topic}.kept.>"])
    async with AgentMessageBus(broker=broker) as bus:
        await bus.publish(Message(topic=f"{topic}.plain", payload=1))
        await bus.publish(Message(topic=f"{topic}.kept.a", payload=2))
        with caplog.at_level(logging.WARNING, logger="amb_core.adapters.redis"):
            assert [m async for m in bus.replay(f"{topic}.plain")] == []
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        text = warnings[0].getMessage()
        assert f"{topic}.plain" in text and "stream_topics" in text and "consumer group" in text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="amb_core.adapters.redis"):
            assert [m async for m in bus.replay(f"{topic}.nothing.*")] == []
        assert "stream_topics" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="amb_core.adapters.redis"):
            assert [m.payload async for m in bus.replay(f"{topic}.kept.a")] == [2]
            # A kept topic replayed past its end: nothing, and nothing to warn about.
            assert [m async for m in bus.replay(f"{topic}.kept.a", since=2**41)] == []
        assert caplog.records == []


async def test_a_slow_batch_keeps_its_read_ahead(raw: redis.Redis, topic: str) -> None:
    """A full batch makes the member ask for the next one at once (read-ahead); those entries
    are pending on the server from then on. A batch that takes longer than claim_idle must
    not let another member take them over before their turn comes."""
    claim_idle = 1.0
    await raw.xgroup_create(topic, "g", id="$", mkstream=True)
    busy = AgentMessageBus(broker=RedisBroker(URL, claim_idle=claim_idle, batch_size=2))
    other_bus = AgentMessageBus(broker=RedisBroker(URL, claim_idle=claim_idle))
    await busy.connect()
    await other_bus.connect()
    handled: list[int] = []
    started, all_four = asyncio.Event(), asyncio.Event()

    async def slow(msg: Message) -> None:
        started.set()
        await asyncio.sleep(claim_idle * 0.8)
        handled.append(msg.payload)
        if len(handled) == 4:
            all_four.set()

    other = Collector()
    try:
        for i in range(4):  # before the member reads: its first batch is full (2 of 4)
            await busy.publish(Message(topic=topic, payload=i))
        await busy.subscribe(topic, slow, consumer_group="g")  # one at a time (prefetch 1)
        await asyncio.wait_for(started.wait(), 10)
        await other_bus.subscribe(topic, other, consumer_group="g")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_four.wait(), 15)
        await asyncio.sleep(claim_idle)  # a window for a late take-over to show up
        assert other.payloads == [], "another member took over entries read ahead"
        assert handled == [0, 1, 2, 3]
    finally:
        await other_bus.close(timeout=2.0)
        await busy.close(timeout=2.0)

"""The behaviour contract every adapter passes (shared/design/contract.md), as a pytest class.

Use it from a test module::

    from amb_core.testing import BrokerContract

    class TestMyBroker(BrokerContract):
        @pytest.fixture
        def broker_factory(self):
            return lambda: MyBroker(url=...)

Optional fixtures a subclass may override:

- ``raw_publish``: ``async (topic, body, headers) -> None`` publishing with the broker's plain
  client, as a foreign producer would (the foreign-input case needs it; headers may be ignored
  by brokers without headers).
- ``restartable``: ``(factory, restart)`` where ``factory()`` makes a broker for a private server
  and ``await restart()`` restarts that server (the reconnect case needs it).

Cases skip themselves only from the broker's declared :class:`Capabilities` (or a missing
optional fixture, which the skip reason names). Topics are unique per test, so the suite runs
against shared servers that keep state between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from amb_core import (
    AgentMessageBus,
    Message,
    RemoteError,
    RequestTimeout,
    RetryPolicy,
    current_message,
    remaining,
)
from amb_core.broker import Broker, Capabilities, Delivery
from amb_core.errors import NotConnected, UnsupportedFeature
from amb_core.retry import ATTEMPTS, ERROR_MESSAGE, ERROR_TYPE, ORIGINAL_TOPIC

BrokerFactory = Callable[[], Broker]
RawPublish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


class Collector:
    """Collects messages and lets a test wait, bounded, until a condition holds."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self._changed.set()

    @property
    def payloads(self) -> list[Any]:
        return [m.payload for m in self.messages]

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"condition not met within {timeout}s; {len(self.messages)} message(s) seen"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_count(self, count: int, timeout: float) -> None:
        await self.wait_for(lambda: len(self.messages) >= count, timeout)


class BrokerContract:
    """The contract cases. ``wait`` scales every bounded wait for slow brokers."""

    wait: float = 10.0
    """Upper bound in seconds for a case to see what it waits for."""
    redelivery_wait: float = 30.0
    """Upper bound for a crashed member's message to be redelivered (broker idle timeouts)."""
    volume: float = 1.0
    """Share of the bulk cases' message counts (5,000 concurrent, 20 x 100 topics, 1,000 to a
    group, 1,000 in order): a broker emulator far slower than the broker it stands for (moto
    for SQS) runs them at a fraction; every case keeps its shape and its checks."""

    def count(self, full: int, least: int = 20) -> int:
        """``full`` scaled by :attr:`volume`, at least ``least``."""
        return max(least, round(full * self.volume))

    # --- fixtures ----------------------------------------------------------------------------

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        raise NotImplementedError("a BrokerContract subclass must define broker_factory")

    @pytest.fixture
    def raw_publish(self) -> RawPublish | None:
        return None

    @pytest.fixture
    def restartable(self) -> tuple[BrokerFactory, Callable[[], Awaitable[None]]] | None:
        return None

    @pytest.fixture
    async def make_bus(
        self, broker_factory: BrokerFactory
    ) -> AsyncIterator[Callable[..., Awaitable[AgentMessageBus]]]:
        buses: list[AgentMessageBus] = []

        async def make(**options: Any) -> AgentMessageBus:
            bus = AgentMessageBus(broker=broker_factory(), **options)
            await bus.connect()
            buses.append(bus)
            return bus

        yield make
        for bus in buses:
            await bus.close(timeout=2.0)

    @pytest.fixture
    async def bus(self, make_bus: Callable[..., Awaitable[AgentMessageBus]]) -> AgentMessageBus:
        return await make_bus()

    @pytest.fixture
    def topic(self) -> str:
        """A topic prefix unique to this test."""
        return f"ct.{uuid.uuid4().hex[:12]}"

    @staticmethod
    def caps(bus: AgentMessageBus) -> Capabilities:
        return bus.broker.capabilities

    @staticmethod
    def need(flag: bool, what: str) -> None:
        if not flag:
            pytest.skip(f"the broker declares no {what}")

    # --- publish / subscribe -----------------------------------------------------------------

    async def test_publish_subscribe_intact(self, bus: AgentMessageBus, topic: str) -> None:
        got = Collector()
        await bus.subscribe(topic, got)
        sent = [
            Message(topic=topic, payload={"n": i, "text": "hello", "nested": {"list": [1, 2.5]}},
                    headers={"x-app": "contract", "x-n": str(i)}, correlation_id=f"c-{i}")
            for i in range(100)
        ]
        for msg in sent:
            await bus.publish(msg)
        await got.wait_count(100, self.wait)
        by_id = {m.id: m for m in got.messages}
        assert len(by_id) == 100
        for msg in sent:
            received = by_id[msg.id]
            assert received.topic == msg.topic
            assert received.payload == msg.payload
            assert received.headers == msg.headers
            assert received.correlation_id == msg.correlation_id
            assert received.timestamp == msg.timestamp
            assert received.attempt == 1

    async def test_concurrent_publishers_and_subscribers(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        publisher_bus = await make_bus()
        subscribers = [Collector() for _ in range(3)]
        for index, collector in enumerate(subscribers):
            sub_bus = publisher_bus if index == 0 else await make_bus()
            await sub_bus.subscribe(topic, collector)

        each = self.count(250, 5)

        async def publisher(p: int) -> None:
            for i in range(each):
                await publisher_bus.publish(Message(topic=topic, payload=[p, i]))

        await asyncio.gather(*(publisher(p) for p in range(20)))
        expected = {(p, i) for p in range(20) for i in range(each)}
        for collector in subscribers:
            await collector.wait_for(
                lambda c=collector: {tuple(x) for x in c.payloads} >= expected,  # type: ignore[misc]
                self.wait * 3,
            )
            if not self.caps(publisher_bus).at_least_once:
                assert len(collector.messages) == 20 * each

    async def test_many_topics(self, bus: AgentMessageBus, topic: str) -> None:
        collectors = {f"{topic}.t{t}": Collector() for t in range(20)}
        for name, collector in collectors.items():
            await bus.subscribe(name, collector)

        each = self.count(100, 5)

        async def publish_all(name: str) -> None:
            for i in range(each):
                await bus.publish(Message(topic=name, payload={"topic": name, "i": i}))

        await asyncio.gather(*(publish_all(name) for name in collectors))
        for name, collector in collectors.items():
            await collector.wait_for(
                lambda c=collector: len({p["i"] for p in c.payloads}) == each,  # type: ignore[misc]
                self.wait,
            )
            assert {p["topic"] for p in collector.payloads} == {name}

    async def test_topic_isolation(self, bus: AgentMessageBus, topic: str) -> None:
        a, b = Collector(), Collector()
        await bus.subscribe(f"{topic}.a", a)
        await bus.subscribe(f"{topic}.b", b)
        for i in range(10):
            await bus.publish(Message(topic=f"{topic}.a", payload=i))
        await bus.publish(Message(topic=f"{topic}.b", payload="sentinel"))
        await b.wait_count(1, self.wait)
        await a.wait_count(10, self.wait)
        assert b.payloads == ["sentinel"]
        assert sorted(a.payloads) == list(range(10))

    async def test_fan_out(self, bus: AgentMessageBus, topic: str) -> None:
        first, second = Collector(), Collector()
        await bus.subscribe(topic, first)
        await bus.subscribe(topic, second)
        for i in range(50):
            await bus.publish(Message(topic=topic, payload=i))
        await first.wait_count(50, self.wait)
        await second.wait_count(50, self.wait)
        assert sorted(first.payloads) == sorted(second.payloads) == list(range(50))

    async def test_wildcards(self, bus: AgentMessageBus, topic: str) -> None:
        self.need(self.caps(bus).wildcards, "wildcards")
        star, tail, exact = Collector(), Collector(), Collector()
        await bus.subscribe(f"{topic}.events.user.*", star)
        await bus.subscribe(f"{topic}.events.>", tail)
        await bus.subscribe(f"{topic}.events", exact)
        for suffix in ("events.user.created", "events.user.a.b", "events.order.created",
                       "events", "events.x"):
            await bus.publish(Message(topic=f"{topic}.{suffix}", payload=suffix))
        await bus.publish(Message(topic=f"{topic}.events.user.done", payload="events.user.done"))
        await star.wait_for(lambda: "events.user.done" in star.payloads, self.wait)
        await tail.wait_for(lambda: "events.user.done" in tail.payloads, self.wait)
        await exact.wait_count(1, self.wait)
        assert sorted(star.payloads) == ["events.user.created", "events.user.done"]
        assert sorted(tail.payloads) == sorted([
            "events.user.created", "events.user.a.b", "events.order.created", "events.x",
            "events.user.done",
        ])
        assert exact.payloads == ["events"]
        assert [m.topic for m in star.messages if m.payload == "events.user.created"] == [
            f"{topic}.events.user.created"
        ]

    # --- consumer groups ---------------------------------------------------------------------

    async def test_consumer_group_exactly_one(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        bus = await make_bus()
        self.need(self.caps(bus).consumer_groups, "consumer groups")
        seen: list[tuple[int, Any]] = []
        done = asyncio.Event()
        total = self.count(1000, 40)

        def member(index: int) -> Callable[[Message], Awaitable[None]]:
            async def handle(msg: Message) -> None:
                seen.append((index, msg.payload))
                await asyncio.sleep(0.001)
                if len({p for _, p in seen}) >= total:
                    done.set()
            return handle

        for index in range(4):
            member_bus = bus if index == 0 else await make_bus()
            await member_bus.subscribe(topic, member(index), consumer_group="workers")
        for i in range(total):
            await bus.publish(Message(topic=topic, payload=i))
        await asyncio.wait_for(done.wait(), self.wait * 3)
        await asyncio.sleep(0.2)  # a window for duplicates to show up, if any
        payloads = [p for _, p in seen]
        assert set(payloads) == set(range(total))
        if not self.caps(bus).at_least_once:
            assert len(payloads) == total, "a message reached more than one member"
        members_used = {index for index, _ in seen}
        assert len(members_used) >= 2, f"the load was not shared: {members_used}"

    async def test_consumer_groups_independent(self, bus: AgentMessageBus, topic: str) -> None:
        self.need(self.caps(bus).consumer_groups, "consumer groups")
        first, second = Collector(), Collector()
        await bus.subscribe(topic, first, consumer_group="group-a")
        await bus.subscribe(topic, second, consumer_group="group-b")
        for i in range(100):
            await bus.publish(Message(topic=topic, payload=i))
        await first.wait_for(lambda: set(first.payloads) == set(range(100)), self.wait)
        await second.wait_for(lambda: set(second.payloads) == set(range(100)), self.wait)

    async def test_durable_group(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        publisher = await make_bus()
        caps = self.caps(publisher)
        self.need(caps.consumer_groups and caps.persistent, "persistent consumer groups")
        first_member = await make_bus()
        sub = await first_member.subscribe(topic, Collector(), consumer_group="durable")
        await sub.unsubscribe()
        await first_member.close()
        for i in range(20):
            await publisher.publish(Message(topic=topic, payload=i))
        await publisher.close()  # close flushes whatever is still pending
        late = Collector()
        joiner = await make_bus()
        await joiner.subscribe(topic, late, consumer_group="durable")
        await late.wait_for(lambda: set(late.payloads) == set(range(20)), self.wait)

    async def test_ordering(self, bus: AgentMessageBus, topic: str) -> None:
        self.need(self.caps(bus).ordering, "ordering guarantee")
        got = Collector()
        total = self.count(1000, 50)
        await bus.subscribe(topic, got)
        for i in range(total):
            await bus.publish(Message(topic=topic, payload=i))
        await got.wait_count(total, self.wait)
        assert got.payloads == list(range(total))

    async def test_ordering_keys_hold_across_a_group(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        """Messages of one ``Message.key`` are handled in order across a group's members."""
        first = await make_bus()
        caps = self.caps(first)
        self.need(caps.ordering_keys and caps.consumer_groups, "ordering keys")
        seen: dict[str, list[int]] = {f"k{k}": [] for k in range(4)}
        done = asyncio.Event()

        async def handle(msg: Message) -> None:
            await asyncio.sleep(0.001 * (msg.payload % 3))  # uneven work, to tempt reordering
            assert msg.key is not None
            if msg.payload not in seen[msg.key]:  # at-least-once: the first delivery counts
                seen[msg.key].append(msg.payload)
            if sum(len(v) for v in seen.values()) == 200:
                done.set()

        for member in (first, await make_bus()):
            await member.subscribe(topic, handle, consumer_group="keyed", max_concurrency=4)
        for n in range(50):
            for key in seen:
                await first.publish(Message(topic=topic, payload=n, key=key))
        await asyncio.wait_for(done.wait(), self.wait * 3)
        for key, order in seen.items():
            assert order == list(range(50)), f"key {key} out of order"

    # --- request / reply ---------------------------------------------------------------------

    async def test_request_response(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()

        async def calculate(msg: Message) -> dict[str, Any]:
            await asyncio.sleep(0.001)
            return {"sum": sum(msg.payload["values"]), "echo": msg.payload["n"]}

        await server.subscribe(topic, calculate, max_concurrency=50)
        reply = await client.request(
            Message(topic=topic, payload={"values": [1, 2, 3], "n": -1}, correlation_id="corr-1"),
            timeout=self.wait,
        )
        assert reply.payload == {"sum": 6, "echo": -1}
        assert reply.correlation_id == "corr-1"

        async def one(n: int) -> None:
            answer = await client.request(
                Message(topic=topic, payload={"values": [n, n], "n": n}), timeout=self.wait
            )
            assert answer.payload == {"sum": 2 * n, "echo": n}

        await asyncio.gather(*(one(n) for n in range(200)))

    async def test_explicit_reply(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()

        async def answer(msg: Message) -> None:
            await server.reply(msg, {"pong": msg.payload}, headers={"x-by": "explicit"})

        await server.subscribe(topic, answer)
        reply = await client.request(Message(topic=topic, payload="ping"), timeout=self.wait)
        assert reply.payload == {"pong": "ping"}
        assert reply.headers.get("x-by") == "explicit"

    async def test_request_timeout_and_late_reply(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(Message(topic=f"{topic}.nobody", payload=1), timeout=0.5)
        assert time.monotonic() - started < 0.5 + 2.0
        assert issubclass(RequestTimeout, TimeoutError)

        calls: list[Any] = []
        release = asyncio.Event()

        async def slow(msg: Message) -> str:
            calls.append(msg.payload)
            await release.wait()
            return "late"

        await server.subscribe(f"{topic}.slow", slow, max_concurrency=4)
        with pytest.raises(RequestTimeout):
            await client.request(Message(topic=f"{topic}.slow", payload="first"), timeout=0.3)
        release.set()
        # The late reply is dropped; a new request still gets its own answer.
        answer = await client.request(Message(topic=f"{topic}.slow", payload="second"),
                                      timeout=self.wait)
        assert answer.payload == "late"
        await asyncio.sleep(0.2)
        assert calls == ["first", "second"], "a reply was re-delivered as a request"

    # --- failures ----------------------------------------------------------------------------

    async def test_handler_error_then_retry(self, bus: AgentMessageBus, topic: str) -> None:
        attempts: list[tuple[str, int]] = []
        done = asyncio.Event()

        async def flaky(msg: Message) -> None:
            attempts.append((msg.id, msg.attempt))
            if len(attempts) < 3:
                raise RuntimeError("transient")
            done.set()

        await bus.subscribe(topic, flaky, consumer_group="retry" if self.caps(bus).consumer_groups
                            else None, retry=RetryPolicy(max_attempts=5, initial_delay=0.05))
        msg = Message(topic=topic, payload="work")
        await bus.publish(msg)
        await asyncio.wait_for(done.wait(), self.wait)
        assert [a for _, a in attempts] == [1, 2, 3]
        assert {i for i, _ in attempts} == {msg.id}

    async def test_poison_message_dead_lettered(self, bus: AgentMessageBus, topic: str) -> None:
        dead, good = Collector(), Collector()
        dlq = f"{topic}.dlq"
        await bus.subscribe(dlq, dead)

        async def handler(msg: Message) -> None:
            if msg.payload == "poison":
                raise ValueError("cannot digest poison")
            await good(msg)

        group = "poison" if self.caps(bus).consumer_groups else None
        await bus.subscribe(topic, handler, consumer_group=group, dead_letter_topic=dlq,
                            retry=RetryPolicy(max_attempts=3, initial_delay=0.02))
        poison = Message(topic=topic, payload="poison", headers={"x-keep": "yes"})
        await bus.publish(poison)
        await bus.publish(Message(topic=topic, payload="fine"))
        await dead.wait_count(1, self.wait)
        await good.wait_count(1, self.wait)
        letter = dead.messages[0]
        assert letter.payload == "poison"
        assert letter.id == poison.id
        assert letter.headers[ERROR_TYPE] == "ValueError"
        assert letter.headers[ERROR_MESSAGE] == "cannot digest poison"
        assert letter.headers[ATTEMPTS] == "3"
        assert letter.headers[ORIGINAL_TOPIC] == topic
        assert letter.headers["x-keep"] == "yes"
        assert good.payloads == ["fine"]

    async def test_default_dead_letter_destination(self, bus: AgentMessageBus, topic: str) -> None:
        dead = Collector()
        destination = bus.broker.default_dead_letter_topic
        await bus.subscribe(destination, dead)

        async def fail(msg: Message) -> None:
            raise KeyError("missing")

        await bus.subscribe(topic, fail, retry=RetryPolicy(max_attempts=1))
        await bus.publish(Message(topic=topic, payload={"k": 1}))
        await dead.wait_for(
            lambda: any(m.headers.get(ORIGINAL_TOPIC) == topic for m in dead.messages), self.wait
        )

    async def test_crash_mid_handler_redelivered(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        doomed = await make_bus()
        self.need(self.caps(doomed).redelivers_unacked, "redelivery of unacknowledged messages")
        started = asyncio.Event()

        async def hang(msg: Message) -> None:
            started.set()
            await asyncio.Event().wait()  # never acknowledges

        await doomed.subscribe(topic, hang, consumer_group="crashy")
        await doomed.publish(Message(topic=topic, payload="survive"))
        await asyncio.wait_for(started.wait(), self.wait)
        await doomed.close(timeout=0)  # dies mid-handler: the handler is cancelled, no ack
        survivor_bus = await make_bus()
        survivor = Collector()
        await survivor_bus.subscribe(topic, survivor, consumer_group="crashy")
        await survivor.wait_for(lambda: "survive" in survivor.payloads, self.redelivery_wait)
        redelivered = next(m for m in survivor.messages if m.payload == "survive")
        assert redelivered.attempt >= 2, "a redelivery must count as a further attempt"

    async def test_foreign_and_malformed_input(
        self, bus: AgentMessageBus, topic: str, raw_publish: RawPublish | None
    ) -> None:
        if raw_publish is None:
            pytest.skip("the adapter's tests provide no raw_publish fixture")
        got, dead = Collector(), Collector()
        dlq = f"{topic}.dlq"
        await bus.subscribe(dlq, dead)
        await bus.subscribe(topic, got, dead_letter_topic=dlq)
        await raw_publish(topic, b"\xff\x00 not json at all", {})
        await raw_publish(topic, b'{"plain": "json from a foreign producer"}', {"x-foreign": "1"})
        prefix = bus.broker.header_prefix
        if self.caps(bus).headers:
            broken = {f"{prefix}specversion": "1.0", f"{prefix}id": "broken-1",
                      "content-type": "application/json"}
            await raw_publish(topic, b"{not json", broken)
        else:
            await raw_publish(topic, b'{"specversion": "1.0", "data": 1}', {})
        await bus.publish(Message(topic=topic, payload="after"))
        await got.wait_for(lambda: "after" in got.payloads, self.wait)
        await dead.wait_count(1, self.wait)
        raw = [m.payload for m in got.messages if m.payload != "after"]
        assert raw == [b"\xff\x00 not json at all", b'{"plain": "json from a foreign producer"}']
        assert dead.messages[0].headers[ERROR_TYPE] == "DecodeError"
        assert dead.messages[0].headers[ORIGINAL_TOPIC] == topic
        assert isinstance(dead.messages[0].payload, bytes)

    async def test_invalid_topics_raise_value_error(self, bus: AgentMessageBus) -> None:
        bad_topics = ["", "   ", "a..b", "a.", ".a", "a.*", "a.>", "a b", "x" * 300, "a.b*"]
        for bad in bad_topics:
            with pytest.raises(ValueError):
                await bus.publish(Message(topic=bad, payload=1))
            with pytest.raises(ValueError):
                await bus.request(Message(topic=bad, payload=1), timeout=0.1)
        for bad_pattern in ["", "a..b", "a.>.b", "a*", " ", "a.b>"]:
            with pytest.raises(ValueError):
                await bus.subscribe(bad_pattern, Collector())

    # --- replay ------------------------------------------------------------------------------

    async def test_replay(self, bus: AgentMessageBus, topic: str) -> None:
        self.need(self.caps(bus).replay, "replay")
        sent = []
        for i in range(5):
            msg = Message(topic=topic, payload=i)
            sent.append(msg)
            await bus.publish(msg)
            await asyncio.sleep(0.01)  # distinct timestamps for the time-based replay
        everything = [m async for m in bus.replay(topic)]
        assert [m.payload for m in everything] == [0, 1, 2, 3, 4]
        assert [m.id for m in everything] == [m.id for m in sent]
        third = everything[2]
        assert third.position is not None
        from_position = [m.payload async for m in bus.replay(topic, since=third.position)]
        assert from_position == [2, 3, 4]
        moment = datetime.fromtimestamp(sent[2].timestamp, timezone.utc)
        from_time = [m.payload async for m in bus.replay(topic, since=moment)]
        assert from_time == [2, 3, 4]

    # --- lifecycle ---------------------------------------------------------------------------

    async def test_unsubscribe(self, bus: AgentMessageBus, topic: str) -> None:
        leaving, staying = Collector(), Collector()
        sub = await bus.subscribe(topic, leaving)
        await bus.subscribe(topic, staying)
        await bus.publish(Message(topic=topic, payload="before"))
        await leaving.wait_count(1, self.wait)
        await sub.unsubscribe()
        await bus.publish(Message(topic=topic, payload="after"))
        await staying.wait_for(lambda: "after" in staying.payloads, self.wait)
        assert leaving.payloads == ["before"]
        assert staying.payloads == ["before", "after"]

    async def test_close_drains_in_flight_handlers(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        bus = await make_bus()
        started, finished = asyncio.Event(), asyncio.Event()

        async def slow(msg: Message) -> None:
            started.set()
            await asyncio.sleep(0.3)
            finished.set()

        await bus.subscribe(topic, slow)
        await bus.publish(Message(topic=topic, payload=1))
        await asyncio.wait_for(started.wait(), self.wait)
        await bus.close(timeout=5.0)
        assert finished.is_set(), "close() returned before the running handler finished"

    async def test_backpressure_bounds_concurrency(self, bus: AgentMessageBus, topic: str) -> None:
        running = 0
        peak = 0
        done = Collector()

        async def slow(msg: Message) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1
            await done(msg)

        await bus.subscribe(topic, slow, max_concurrency=3)
        # At once, so a backlog exists even where one publish takes longer than a handler.
        await asyncio.gather(*(bus.publish(Message(topic=topic, payload=i)) for i in range(30)))
        await done.wait_count(30, self.wait)
        assert peak == 3

    async def test_sync_handler_runs_off_the_loop(self, bus: AgentMessageBus, topic: str) -> None:
        import threading

        loop_thread = threading.get_ident()
        threads: list[int] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def blocking(msg: Message) -> None:
            threads.append(threading.get_ident())
            time.sleep(0.01)
            loop.call_soon_threadsafe(done.set)

        await bus.subscribe(topic, blocking)
        await bus.publish(Message(topic=topic, payload=1))
        await asyncio.wait_for(done.wait(), self.wait)
        assert threads and threads[0] != loop_thread

    async def test_reconnect(
        self,
        restartable: tuple[BrokerFactory, Callable[[], Awaitable[None]]] | None,
        topic: str,
    ) -> None:
        if restartable is None:
            pytest.skip("the adapter's tests provide no restartable server")
        factory, restart = restartable
        self.need(factory().capabilities.reconnect, "reconnect")
        bus = AgentMessageBus(broker=factory())
        await bus.connect()
        try:
            plain, grouped = Collector(), Collector()
            await bus.subscribe(f"{topic}.plain", plain)
            if bus.broker.capabilities.consumer_groups:
                await bus.subscribe(f"{topic}.group", grouped, consumer_group="survivors")
            await bus.publish(Message(topic=f"{topic}.plain", payload="before"))
            await plain.wait_count(1, self.wait)
            await restart()
            # Publishing may fail while the broker is down or reconnecting: retry, bounded.
            deadline = time.monotonic() + self.wait * 3
            while True:
                try:
                    await bus.publish(Message(topic=f"{topic}.plain", payload="probe"))
                    break
                except (ConnectionError, OSError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            # Plain subscriptions are at-most-once: wait until one probe gets through.
            while "probe" not in plain.payloads:
                if time.monotonic() > deadline:
                    raise AssertionError("the plain subscription did not resume")
                await asyncio.sleep(0.2)
                await bus.publish(Message(topic=f"{topic}.plain", payload="probe"))
            if bus.broker.capabilities.consumer_groups and bus.broker.capabilities.persistent:
                for i in range(50):
                    await bus.publish(Message(topic=f"{topic}.group", payload=i))
                await grouped.wait_for(
                    lambda: set(grouped.payloads) >= set(range(50)), self.wait * 2
                )
        finally:
            await bus.close(timeout=2.0)

    # --- payloads ----------------------------------------------------------------------------

    async def test_big_and_odd_payloads(self, bus: AgentMessageBus, topic: str) -> None:
        got = Collector()
        unicode_topic = f"{topic}.événements.用户"
        await bus.subscribe(topic, got)
        await bus.subscribe(unicode_topic, got)
        limit = self.caps(bus).max_payload
        size = 1024 * 1024 if limit is None else min(1024 * 1024, limit - 4096)
        big = "x" * size
        payloads: list[Any] = [None, "", {}, [], 0, False, b"", b"\x00\xff\x10binary", big]
        for payload in payloads:
            await bus.publish(Message(topic=topic, payload=payload))
        await bus.publish(Message(topic=unicode_topic, payload="ünïcödé ✓",
                                  headers={"x-note": "värde ✓"}))
        await got.wait_count(len(payloads) + 1, self.wait)
        received = got.payloads
        for payload in payloads:  # by type too: 0 == False, and b"" must not come back as ""
            assert any(type(r) is type(payload) and r == payload for r in received), payload
        odd = [m for m in got.messages if m.topic == unicode_topic]
        assert odd and odd[0].payload == "ünïcödé ✓"
        assert odd[0].headers["x-note"] == "värde ✓"
        assert isinstance(next(p for p in received if p == b"\x00\xff\x10binary"), bytes)

    async def test_payload_over_the_broker_limit_is_refused(
        self, bus: AgentMessageBus, topic: str
    ) -> None:
        limit = self.caps(bus).max_payload
        if limit is None:
            pytest.skip("the broker declares no payload limit")
        with pytest.raises(ValueError, match="limit"):
            await bus.publish(Message(topic=topic, payload=b"x" * (limit + 1)))


    # --- consumer groups on wildcard patterns ------------------------------------------------

    async def test_group_on_a_wildcard_pattern(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        """Either exactly the matching messages, each to one member, or UnsupportedFeature at
        the call: never the client library's own error."""
        first, second = await make_bus(), await make_bus()
        caps = self.caps(first)
        self.need(caps.consumer_groups and caps.wildcards, "consumer groups with wildcards")
        star: list[tuple[int, Any]] = []
        tail: list[tuple[int, Any]] = []

        def member(seen: list[tuple[int, Any]], index: int) -> Callable[[Message], Awaitable[None]]:
            async def handle(msg: Message) -> None:
                seen.append((index, msg.payload))
            return handle

        try:
            for index, member_bus in enumerate((first, second)):
                await member_bus.subscribe(f"{topic}.events.user.*", member(star, index),
                                           consumer_group="wild")
                await member_bus.subscribe(f"{topic}.events.>", member(tail, index),
                                           consumer_group="tail")
        except UnsupportedFeature:
            return  # refused at the call, clearly: allowed
        suffixes = ["events.user.created", "events.user.a.b", "events.order.created",
                    "events.user.deleted", "events", "other.user.created"]
        for round_ in range(5):
            for suffix in suffixes:
                await first.publish(Message(topic=f"{topic}.{suffix}", payload=[round_, suffix]))
        star_expected = {(r, s) for r in range(5) for s in ("events.user.created",
                                                           "events.user.deleted")}
        tail_expected = {(r, s) for r in range(5) for s in suffixes[:4]}
        deadline = time.monotonic() + self.wait
        while {tuple(p) for _, p in star} < star_expected or \
                {tuple(p) for _, p in tail} < tail_expected:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a window for strays and duplicates to show up
        assert {tuple(p) for _, p in star} == star_expected
        assert {tuple(p) for _, p in tail} == tail_expected
        if not caps.at_least_once:
            assert len(star) == len(star_expected), "a message reached more than one member"
            assert len(tail) == len(tail_expected), "a message reached more than one member"

    # --- dead letters wait for their reader ---------------------------------------------------

    async def test_dead_letters_wait_for_their_reader(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        """A dead letter written while nobody reads its destination reaches a consumer group
        that subscribes later, oldest first: for a subscription's own destination and for the
        broker's default one (made unique to this test here)."""
        failing = await make_bus()
        caps = self.caps(failing)
        self.need(caps.persistent and caps.consumer_groups, "persistent consumer groups")
        own, default = f"{topic}.dlq", f"{topic}.default-dlq"
        failing.broker.default_dead_letter_topic = default

        async def fail(msg: Message) -> None:
            raise RuntimeError(f"cannot handle {msg.payload}")

        once = RetryPolicy(max_attempts=1)
        await failing.subscribe(f"{topic}.a", fail, consumer_group="g", retry=once,
                                dead_letter_topic=own)
        await failing.subscribe(f"{topic}.b", fail, consumer_group="g", retry=once)
        for i in range(3):
            await failing.publish(Message(topic=f"{topic}.a", payload=i))
            await failing.publish(Message(topic=f"{topic}.b", payload=i))
        for destination in (own, default):
            await self._wait_for_letters(failing, destination, 3)
        await failing.close()

        operators = await make_bus()
        operators.broker.default_dead_letter_topic = default
        got_own, got_default = Collector(), Collector()
        await operators.subscribe(own, got_own, consumer_group="operators")
        await operators.subscribe(default, got_default, consumer_group="operators")
        await got_own.wait_count(3, self.wait)
        await got_default.wait_count(3, self.wait)
        if caps.ordering:  # oldest first, where the broker keeps an order at all
            assert got_own.payloads[:3] == [0, 1, 2]
            assert got_default.payloads[:3] == [0, 1, 2]
        assert sorted(got_own.payloads) == sorted(got_default.payloads) == [0, 1, 2]
        assert {m.headers[ORIGINAL_TOPIC] for m in got_own.messages} == {f"{topic}.a"}
        assert {m.headers[ORIGINAL_TOPIC] for m in got_default.messages} == {f"{topic}.b"}

    async def _wait_for_letters(self, bus: AgentMessageBus, destination: str,
                                count: int) -> list[Any]:
        deadline = time.monotonic() + self.wait
        while True:
            letters = await bus.dead_letters(destination)
            if len(letters) >= count or time.monotonic() > deadline:
                assert len(letters) == count, f"{len(letters)} letter(s) at {destination}"
                return letters
            await asyncio.sleep(0.05)

    async def test_dead_letters_list_and_redrive(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        bus = await make_bus()
        caps = self.caps(bus)
        self.need(caps.persistent or caps.replay, "kept dead letters")
        dlq = f"{topic}.dlq"
        healthy = asyncio.Event()
        handled = Collector()

        async def flaky(msg: Message) -> None:
            if not healthy.is_set():
                raise ValueError("broken for now")
            await handled(msg)

        group = "redrive" if caps.consumer_groups else None
        await bus.subscribe(topic, flaky, consumer_group=group, dead_letter_topic=dlq,
                            retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
        started = time.time()
        for payload in ("a", "b"):
            await bus.publish(Message(topic=topic, payload=payload, headers={"x-keep": "1"}))
        letters = await self._wait_for_letters(bus, dlq, 2)
        # listed in the order they died; with retry jitter "b" may die before "a"
        assert sorted(letter.message.payload for letter in letters) == ["a", "b"]
        if caps.ordering:
            times = [letter.dead_lettered_at or 0.0 for letter in letters]
            assert times == sorted(times), "dead letters not listed oldest first"
        for letter in letters:
            assert letter.original_topic == topic
            assert letter.error_type == "ValueError"
            assert letter.error_message == "broken for now"
            assert letter.attempts == 2
            assert letter.dead_lettered_at is not None
            assert started - 1 <= letter.dead_lettered_at <= time.time() + 1
            assert letter.message.headers["x-keep"] == "1"
        healthy.set()
        result = await bus.redrive_dead_letters(dlq)
        assert result.redriven == 2
        await handled.wait_count(2, self.wait)
        assert sorted(handled.payloads) == ["a", "b"]
        assert all(m.attempt == 1 for m in handled.messages)
        assert all(ERROR_TYPE not in m.headers for m in handled.messages)
        assert all(m.headers.get("x-keep") == "1" for m in handled.messages)
        if result.removed:
            assert result.removed == 2 and result.kept is None
            assert await bus.dead_letters(dlq) == []
        else:
            assert result.kept, "a redrive that removes nothing must say why"

    # --- the adapter on its own (as Watermill's universal tests drive a Subscriber) ----------

    @pytest.fixture
    async def adapter(self, broker_factory: BrokerFactory) -> AsyncIterator[Broker]:
        broker = broker_factory()
        await broker.connect()
        yield broker
        await broker.close()

    async def test_adapter_unacked_comes_back_acked_does_not(
        self, adapter: Broker, broker_factory: BrokerFactory, topic: str
    ) -> None:
        """An adapter whose ack() does nothing, or that loses what was not acknowledged when
        a member goes away, fails here."""
        caps = adapter.capabilities
        self.need(caps.redelivers_unacked and caps.consumer_groups,
                  "redelivery of unacknowledged messages")
        first: list[Delivery] = []
        both = asyncio.Event()

        async def ack_only_the_first(delivery: Delivery) -> None:
            first.append(delivery)
            if delivery.body == b"acked":
                await delivery.ack()
            if len(first) >= 2:
                both.set()

        sub = await adapter.subscribe(topic, ack_only_the_first, group="adapter")
        await adapter.publish(topic, b"acked", {})
        await adapter.publish(topic, b"unacked", {})
        await asyncio.wait_for(both.wait(), self.wait)
        await sub.close()

        second: list[Delivery] = []
        arrived = asyncio.Event()

        async def record(delivery: Delivery) -> None:
            second.append(delivery)
            await delivery.ack()
            bodies = {d.body for d in second}
            if {b"unacked", b"sentinel"} <= bodies:
                arrived.set()

        other = broker_factory()
        await other.connect()
        try:
            await other.subscribe(topic, record, group="adapter")
            await other.publish(topic, b"sentinel", {})
            await asyncio.wait_for(arrived.wait(), self.redelivery_wait)
            await asyncio.sleep(0.2)  # a window for an acked message to come back, if it does
            bodies = [d.body for d in second]
            assert b"acked" not in bodies, "an acknowledged message was delivered again"
            redelivered = next(d for d in second if d.body == b"unacked")
            assert redelivered.delivery_count is not None and redelivered.delivery_count >= 2
        finally:
            await other.close()

    async def test_adapter_retry_later_redelivers_with_a_higher_count(
        self, adapter: Broker, topic: str
    ) -> None:
        """An adapter whose retry_later() says it took the message must redeliver it."""
        counts: list[int | None] = []
        again = asyncio.Event()
        took: list[bool] = []

        async def retry_once(delivery: Delivery) -> None:
            counts.append(delivery.delivery_count)
            if len(counts) == 1:
                took.append(await delivery.retry_later(0.05))
                if not took[0]:
                    await delivery.ack()
                    again.set()
                return
            await delivery.ack()
            again.set()

        group = "retry-later" if adapter.capabilities.consumer_groups else None
        await adapter.subscribe(topic, retry_once, group=group)
        await adapter.publish(topic, b"again", {})
        await asyncio.wait_for(again.wait(), self.redelivery_wait)
        if not took[0]:
            pytest.skip("the adapter leaves retries to the bus (retry_later returns False)")
        assert len(counts) == 2
        assert counts[0] is not None and counts[1] is not None and counts[1] > counts[0]

    async def test_concurrent_close(self, broker_factory: BrokerFactory, topic: str) -> None:
        bus = AgentMessageBus(broker=broker_factory())
        await bus.connect()
        await bus.subscribe(topic, Collector())
        await asyncio.wait_for(asyncio.gather(bus.close(), bus.close(), bus.close()), self.wait)
        assert not bus.is_connected
        broker = broker_factory()
        await broker.connect()
        await asyncio.wait_for(asyncio.gather(broker.close(), broker.close()), self.wait)

    async def test_publish_after_close_raises_not_connected(
        self, broker_factory: BrokerFactory, topic: str
    ) -> None:
        broker = broker_factory()
        await broker.connect()
        await broker.close()
        with pytest.raises(NotConnected):
            await broker.publish(topic, b"late", {})
        bus = AgentMessageBus(broker=broker_factory())
        await bus.connect()
        await bus.close()
        with pytest.raises(NotConnected):
            await bus.publish(Message(topic=topic, payload="late"))
        with pytest.raises(NotConnected):
            await bus.request(Message(topic=topic, payload="late"), timeout=0.1)

    async def test_adapter_leaves_the_callers_headers_alone(
        self, adapter: Broker, topic: str
    ) -> None:
        got = asyncio.Event()

        async def take(delivery: Delivery) -> None:
            await delivery.ack()
            got.set()

        await adapter.subscribe(topic, take)
        headers = {"x-app": "contract", "content-type": "application/json",
                   f"{adapter.header_prefix}id": "h-1"}
        before = dict(headers)
        await adapter.publish(topic, b"{}", headers)
        await asyncio.wait_for(got.wait(), self.wait)
        assert headers == before, "the adapter changed the headers it was given"


    # --- agent conversations: streams, failures, cancellation, causation, deadlines, gather --

    async def test_stream_arrives_in_order_then_ends(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()

        async def writer(msg: Message) -> AsyncIterator[dict[str, int]]:
            for n in range(msg.payload["chunks"]):
                yield {"n": n}

        await server.subscribe(topic, writer)
        chunks = [c async for c in client.stream(Message(topic=topic, payload={"chunks": 200}),
                                                 timeout=self.wait)]
        assert [c.payload for c in chunks] == [{"n": n} for n in range(200)]
        empty = [c async for c in client.stream(Message(topic=topic, payload={"chunks": 0}),
                                                timeout=self.wait)]
        assert empty == []

    async def test_stream_error_raises_in_the_caller(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()

        async def broken(msg: Message) -> AsyncIterator[str]:
            yield "one"
            yield "two"
            raise ValueError("the model went away")

        await server.subscribe(topic, broken)
        got: list[Any] = []
        with pytest.raises(RemoteError) as info:
            async for chunk in client.stream(Message(topic=topic, payload=None),
                                             timeout=self.wait):
                got.append(chunk.payload)
        assert got == ["one", "two"]
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_text == "the model went away"

    async def test_a_caller_that_stops_reading_cancels_the_stream(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()
        stopped = asyncio.Event()
        produced = 0

        async def endless(msg: Message) -> AsyncIterator[int]:
            nonlocal produced
            try:
                while True:
                    produced += 1
                    yield produced
                    await asyncio.sleep(0.01)
            finally:
                stopped.set()

        await server.subscribe(topic, endless)
        async for chunk in client.stream(Message(topic=topic, payload=None), timeout=self.wait):
            if chunk.payload >= 3:
                break
        await asyncio.wait_for(stopped.wait(), self.wait)
        count = produced
        await asyncio.sleep(0.1)
        assert produced == count, "the handler went on after its caller stopped"
        # The subscription itself is untouched: the next stream works.
        again = client.stream(Message(topic=topic, payload=None), timeout=self.wait)
        first = await again.__anext__()
        await again.aclose()
        assert first.payload >= 1

    async def test_a_failing_request_handler_raises_remote_error_in_the_caller(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        server, client = await make_bus(), await make_bus()

        async def fail(msg: Message) -> str:
            raise KeyError("no such account")

        await server.subscribe(topic, fail, retry=RetryPolicy(max_attempts=2,
                                                                initial_delay=0.01))
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await client.request(Message(topic=topic, payload=1), timeout=self.wait)
        assert info.value.remote_type == "KeyError"
        assert time.monotonic() - started < self.wait / 2, "the caller waited out its timeout"

    async def test_causation_follows_itself(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        bus = await make_bus()
        notes, answered = Collector(), Collector()

        async def lookup(msg: Message) -> str:
            await answered(msg)
            return "found"

        async def planner(msg: Message) -> Any:
            assert current_message() is msg
            await bus.publish(Message(topic=f"{topic}.notes", payload="planning"))
            return (await bus.request(Message(topic=f"{topic}.lookup", payload="q"),
                                      timeout=self.wait)).payload

        await bus.subscribe(f"{topic}.notes", notes)
        await bus.subscribe(f"{topic}.lookup", lookup)
        await bus.subscribe(f"{topic}.plan", planner, max_concurrency=2)
        client = await make_bus()
        ask = Message(topic=f"{topic}.plan", payload="go", correlation_id="conversation-1")
        reply = await client.request(ask, timeout=self.wait)
        assert reply.payload == "found"
        await notes.wait_count(1, self.wait)
        for child in (notes.messages[0], answered.messages[0]):
            assert child.correlation_id == "conversation-1"
            assert child.causation_id == ask.id
        assert current_message() is None

    async def test_deadlines_are_inherited_and_expired_messages_skipped(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        bus, client = await make_bus(), await make_bus()
        budgets: dict[str, float | None] = {}

        async def inner(msg: Message) -> str:
            budgets["inner"] = remaining()
            return "ok"

        async def outer(msg: Message) -> Any:
            budgets["outer"] = remaining()
            return (await bus.request(Message(topic=f"{topic}.inner", payload=1))).payload

        await bus.subscribe(f"{topic}.inner", inner)
        await bus.subscribe(f"{topic}.outer", outer, max_concurrency=2)
        assert (await client.request(Message(topic=f"{topic}.outer", payload=1),
                                     timeout=3.0)).payload == "ok"
        outer_left, inner_left = budgets["outer"], budgets["inner"]
        assert outer_left is not None and inner_left is not None
        assert 0 < inner_left <= outer_left + 0.01 <= 3.01, budgets  # not the 30 s default
        assert remaining() is None

        handled = Collector()
        await bus.subscribe(f"{topic}.late", handled)
        stale = Message(topic=f"{topic}.late", payload="stale",
                        headers={"amb-timeout": "1.000", "amb-expires": f"{time.time() - 60:.3f}"})
        await client.publish(stale)
        await client.publish(Message(topic=f"{topic}.late", payload="fresh"))
        await handled.wait_count(1, self.wait)
        await asyncio.sleep(0.1)
        assert handled.payloads == ["fresh"], "a message past its deadline was handled"

    async def test_gather_collects_every_responder(
        self, make_bus: Callable[..., Awaitable[AgentMessageBus]], topic: str
    ) -> None:
        client = await make_bus()

        def reviewer(verdict: str | None) -> Callable[[Message], Awaitable[str]]:
            async def review(msg: Message) -> str:
                if verdict is None:
                    raise RuntimeError("reviewer crashed")
                return verdict
            return review

        for verdict in ("approve", "approve", "reject", None):
            responder = await make_bus()
            await responder.subscribe(topic, reviewer(verdict),
                                      retry=RetryPolicy(max_attempts=1))
        started = time.monotonic()
        result = await client.gather(Message(topic=topic, payload="draft"), timeout=self.wait,
                                     max_replies=4)
        assert time.monotonic() - started < self.wait / 2, "gather waited for its timeout"
        assert sorted(r.payload for r in result.replies) == ["approve", "approve", "reject"]
        assert [e.remote_type for e in result.errors] == ["RuntimeError"]
        quick = await client.gather(Message(topic=topic, payload="draft"), timeout=self.wait,
                                    max_replies=1)
        assert len(quick.replies) + len(quick.errors) >= 1
        nobody = await client.gather(Message(topic=f"{topic}.nobody", payload=1), timeout=0.3)
        assert nobody.replies == [] and nobody.errors == []

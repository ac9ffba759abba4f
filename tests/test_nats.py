"""NATS-specific behaviour beyond the contract suite, against real nats-server instances."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest
from tests.conftest import require_server
from tests.servers import PrivateNATS, free_port
from tests.test_contract_nats import HOST, PORT, URL

from amb_core import AgentMessageBus, Message, RetryPolicy
from amb_core.adapters import broker_from_url
from amb_core.adapters.nats import NATSBroker, flush_in_order
from amb_core.errors import (
    BrokerConnectionError,
    NoResponders,
    NotConnected,
    RequestTimeout,
    UnsupportedFeature,
)
from amb_core.retry import ATTEMPTS, ORIGINAL_TOPIC
from amb_core.runtime import ReconnectPolicy
from amb_core.testing.contract import Collector

WAIT = 10.0


def js_broker(url: str = URL, **options: Any) -> NATSBroker:
    options.setdefault("stream_max_age", 3600.0)
    return NATSBroker(servers=[url], use_jetstream=True, **options)


@pytest.fixture
def topic() -> str:
    require_server("nats", HOST, PORT)
    return f"nt.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def core_topic() -> str:
    """A topic no stream captures (JetStream tests make one for ``nt``)."""
    require_server("nats", HOST, PORT)
    return f"ntcore.{uuid.uuid4().hex[:12]}"


async def stream_messages(broker: NATSBroker, topic: str) -> list[Any]:
    import nats

    nc = await nats.connect(URL)
    try:
        js = nc.jetstream()
        info = await js.stream_info(await broker._js.stream_for(topic), subjects_filter=topic)
        return [info.state.subjects.get(topic, 0) if info.state.subjects else 0]
    finally:
        await nc.close()


# --- construction, URLs, credentials ---------------------------------------------------------


def test_from_url_options_and_masking() -> None:
    broker = broker_from_url(
        "nats://alice:s3cret@127.0.0.1:4222?jetstream=true&ack_wait=7.5&pull_batch=8"
        "&stream=ORDERS&group_start=all"
    )
    assert isinstance(broker, NATSBroker)
    assert broker.use_jetstream and broker.capabilities.persistent
    assert broker.ack_wait == 7.5 and broker.pull_batch == 8 and broker.stream == "ORDERS"
    assert broker.group_start == "all"
    assert "s3cret" not in repr(broker) and "alice" in repr(broker)
    core = NATSBroker.from_url("nats://h1:4222,h2:4222")
    assert core.servers == ["nats://h1:4222", "nats://h2:4222"]
    assert not core.capabilities.persistent and core.capabilities.native_request_reply
    with pytest.raises(ValueError, match="unknown NATS URL parameter"):
        NATSBroker.from_url("nats://h:4222?jetstrem=true")


def test_credentials_never_in_repr() -> None:
    broker = NATSBroker(user="u", password="hunter2", token="tok-123", use_jetstream=True)
    assert "hunter2" not in repr(broker) and "tok-123" not in repr(broker)
    assert "hunter2" not in str(vars(broker).get("servers"))


async def test_connect_refused_fails_fast_and_says_so() -> None:
    """Nothing listens on the port: fail at once, saying so (it waited out the connect
    timeout, 5.8 s, and said "timed out")."""
    url = f"nats://127.0.0.1:{free_port()}"
    broker = NATSBroker(servers=[url])  # the default connect timeout, 5 s
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match="refused") as failure:
        await broker.connect()
    assert time.monotonic() - started < 1.0
    assert "timed out" not in str(failure.value)
    assert broker._nc is None
    with pytest.raises(NotConnected):
        await broker.publish("x", b"", {})


async def test_every_server_refused_fails_fast() -> None:
    broker = NATSBroker(servers=[f"nats://127.0.0.1:{free_port()}" for _ in range(3)])
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match="refused"):
        await broker.connect()
    assert time.monotonic() - started < 1.0


async def test_silent_server_times_out_after_connect_timeout() -> None:
    """A server that takes the TCP connection and never says a word (no INFO)."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        broker = NATSBroker(servers=[f"nats://127.0.0.1:{port}"],
                            reconnect=ReconnectPolicy(connect_timeout=0.5))
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError, match=r"timed out after 0\.5s"):
            await broker.connect()
        elapsed = time.monotonic() - started
        assert 0.45 < elapsed < 2.0, elapsed
        assert accepted, "the client never reached the silent server"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_reconnect_options_are_one_policy() -> None:
    default = NATSBroker()
    assert default.reconnect == ReconnectPolicy() and default.connect_timeout == 5.0
    policy = ReconnectPolicy(initial_delay=0.1, max_delay=0.4, jitter=0.0, connect_timeout=2.0)
    broker = NATSBroker(reconnect=policy)
    assert broker.reconnect is policy and broker.connect_timeout == 2.0
    delays = [broker._next_server([], {})[1] for _ in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]  # capped exponential backoff
    # The old names are aliases: a fixed wait, and the connect timeout.
    alias = NATSBroker(reconnect_time_wait=0.2, connect_timeout=1.0)
    assert alias.reconnect.initial_delay == alias.reconnect.max_delay == 0.2
    assert alias.connect_timeout == 1.0
    assert NATSBroker.from_url("nats://h:4222?reconnect_time_wait=0.3").reconnect.max_delay == 0.3
    with pytest.raises(ValueError, match="ReconnectPolicy"):
        NATSBroker(max_reconnect_attempts=3)  # nats-py's own name: one set of options


async def test_user_password_pass_through_and_not_logged(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    server = PrivateNATS()
    server.extra_args = ["--user", "agent", "--pass", "pa55-word"]
    server.start()
    try:
        caplog.set_level(logging.DEBUG)
        good = NATSBroker(servers=[server.url], user="agent", password="pa55-word")
        async with AgentMessageBus(broker=good) as bus:
            got = Collector()
            await bus.subscribe("auth.check", got)
            await bus.publish(Message(topic="auth.check", payload="ok"))
            await got.wait_count(1, WAIT)
        bad = NATSBroker(servers=[server.url], user="agent", password="wrong-pa55",
                         connect_timeout=1.5)
        with pytest.raises(BrokerConnectionError) as failure:
            await bad.connect()
        assert "wrong-pa55" not in str(failure.value)
        url_broker = NATSBroker.from_url(f"nats://agent:pa55-word@127.0.0.1:{server.port}")
        await url_broker.connect()
        await url_broker.close()
        assert "pa55-word" not in repr(url_broker)
        assert "pa55-word" not in caplog.text and "wrong-pa55" not in caplog.text
    finally:
        server.cleanup()


# --- core subscriptions ----------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False])
async def test_core_slow_consumer_drops_beyond_its_limit_and_says_so(
    core_topic: str, caplog: pytest.LogCaptureFixture, fast_path: bool
) -> None:
    """Core NATS is at-most-once: a subscription whose handler is stuck holds at most
    ``pending_msgs_limit`` messages and drops the rest (logged once) instead of growing."""
    limit, sent = 10, 50
    broker = NATSBroker(servers=[URL], pending_msgs_limit=limit, fast_path=fast_path)
    release = asyncio.Event()
    stuck = Collector()

    async def blocked(msg: Message) -> None:
        await stuck(msg)
        await release.wait()

    async with AgentMessageBus(broker=broker) as bus:
        await bus.subscribe(core_topic, blocked)
        for i in range(sent):
            await bus.publish(Message(topic=core_topic, payload=i))
        # The server answers this connection's PING after delivering what its PUBs before
        # it sent to this same connection: once the PONG is in, all 50 were offered.
        assert broker._nc is not None
        await flush_in_order(broker._nc)
        release.set()
        await bus.publish(Message(topic=core_topic, payload="last"))
        await stuck.wait_for(lambda: stuck.payloads[-1:] == ["last"], WAIT)
    kept = stuck.payloads[:-1]
    # The first `limit` wait in order; one more fits once the handler took the first.
    assert kept[:limit] == list(range(limit)) and len(kept) <= limit + 1
    assert kept == sorted(kept)
    assert caplog.text.count("slow consumer") == 1


# --- request / reply -------------------------------------------------------------------------


async def test_request_nobody_serves_fails_fast_and_names_the_topic(core_topic: str) -> None:
    topic = f"{core_topic}.calculate"
    async with AgentMessageBus(broker=NATSBroker(servers=[URL])) as bus:
        started = time.monotonic()
        with pytest.raises(NoResponders, match=f"no responders for '{topic}'"):
            await bus.request(Message(topic=topic, payload=1), timeout=5.0)
        assert time.monotonic() - started < 1.0
        assert issubclass(NoResponders, RequestTimeout)


async def test_foreign_requester_gets_reply(core_topic: str) -> None:
    topic = core_topic
    import nats

    async with AgentMessageBus(broker=NATSBroker(servers=[URL])) as bus:
        await bus.subscribe(topic, lambda msg: msg.payload.upper())  # foreign: raw bytes
        nc = await nats.connect(URL)
        try:
            reply = await nc.request(topic, b'"hi"', timeout=WAIT)
        finally:
            await nc.close()
        assert reply.data == b'"HI"'
        assert reply.headers is not None and reply.headers["ce-specversion"] == "1.0"


async def test_request_served_by_jetstream_group(topic: str) -> None:
    async with AgentMessageBus(broker=js_broker()) as server, \
            AgentMessageBus(broker=js_broker()) as client:
        await server.subscribe(topic, lambda msg: msg.payload * 2, consumer_group="rpc")
        reply = await client.request(Message(topic=topic, payload=21), timeout=WAIT)
        assert reply.payload == 42


# --- JetStream groups: retries, dead letters, in-progress, crash ------------------------------


async def test_retry_is_a_delayed_nak_counted_by_jetstream(topic: str) -> None:
    attempts: list[tuple[int, float]] = []
    done = asyncio.Event()

    async def flaky(msg: Message) -> None:
        attempts.append((msg.attempt, time.monotonic()))
        if len(attempts) < 3:
            raise RuntimeError("transient")
        done.set()

    async with AgentMessageBus(broker=js_broker()) as bus:
        sub = await bus.subscribe(topic, flaky, consumer_group="retry", retry=RetryPolicy(
            max_attempts=5, initial_delay=0.4, backoff=1.0, jitter=0.0))
        await bus.publish(Message(topic=topic, payload="work"))
        await asyncio.wait_for(done.wait(), WAIT)
        assert [a for a, _ in attempts] == [1, 2, 3]  # JetStream's num_delivered
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
        assert all(gap >= 0.35 for gap in gaps), gaps  # the nak's delay, kept by the server
        assert sub._broker_sub is not None
        assert not sub._broker_sub._held  # type: ignore[attr-defined]


async def test_dead_letter_then_acked_not_redelivered(topic: str) -> None:
    calls: list[int] = []
    dead = Collector()

    async def poison(msg: Message) -> None:
        calls.append(msg.attempt)
        raise ValueError("never")

    broker = js_broker(ack_wait=1.0)
    async with AgentMessageBus(broker=broker) as bus:
        await bus.subscribe(f"{topic}.dlq", dead, consumer_group="dlq-readers")
        await bus.subscribe(topic, poison, consumer_group="g", dead_letter_topic=f"{topic}.dlq",
                            retry=RetryPolicy(max_attempts=2, initial_delay=0.05))
        await bus.publish(Message(topic=topic, payload="p"))
        await dead.wait_count(1, WAIT)
        assert dead.messages[0].headers[ATTEMPTS] == "2"
        assert dead.messages[0].headers[ORIGINAL_TOPIC] == topic
        await asyncio.sleep(2.5)  # more than 2 x ack_wait: an unacked message would be back
        assert calls == [1, 2]
        import nats

        nc = await nats.connect(URL)
        try:
            js = nc.jetstream()
            stream = await broker._js.stream_for(topic)
            info = await js.consumer_info(stream, broker._js.consumer_name("g", topic))
            assert info.num_ack_pending == 0 and info.num_pending == 0
        finally:
            await nc.close()


async def test_long_handler_kept_alive_with_in_progress_acks(topic: str) -> None:
    first_calls: list[str] = []
    other = Collector()
    started, done = asyncio.Event(), asyncio.Event()

    async def slow(msg: Message) -> None:
        first_calls.append(msg.payload)
        started.set()
        await asyncio.sleep(3.0)  # three times ack_wait
        done.set()

    async with AgentMessageBus(broker=js_broker(ack_wait=1.0)) as a, \
            AgentMessageBus(broker=js_broker(ack_wait=1.0)) as b:
        await a.subscribe(topic, slow, consumer_group="long")
        await a.publish(Message(topic=topic, payload="job"))
        await asyncio.wait_for(started.wait(), WAIT)
        await b.subscribe(topic, other, consumer_group="long")
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(1.5)
        assert first_calls == ["job"]
        assert other.messages == [], "the running message was redelivered to another member"


CRASHING_MEMBER = textwrap.dedent("""
    import asyncio, sys
    from amb_core import AgentMessageBus
    from amb_core.adapters.nats import NATSBroker

    async def main():
        bus = AgentMessageBus(broker=NATSBroker(servers=[sys.argv[1]], use_jetstream=True,
                                                ack_wait=float(sys.argv[3])))
        await bus.connect()
        async def hang(msg):
            print("got", msg.payload, flush=True)
            await asyncio.Event().wait()
        await bus.subscribe(sys.argv[2], hang, consumer_group="crash")
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_killed_member_message_redelivered_after_ack_wait(topic: str) -> None:
    ack_wait = 2.0
    member = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_MEMBER, URL, topic, str(ack_wait),
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert member.stdout is not None
        line = await asyncio.wait_for(member.stdout.readline(), WAIT)
        assert line.strip() == b"ready"
        async with AgentMessageBus(broker=js_broker(ack_wait=ack_wait)) as bus:
            await bus.publish(Message(topic=topic, payload="survive"))
            line = await asyncio.wait_for(member.stdout.readline(), WAIT)
            assert line.strip() == b"got survive"
            member.send_signal(signal.SIGKILL)  # no ack, no nak, no goodbye
            await asyncio.wait_for(member.wait(), 5)
            killed_at = time.monotonic()
            survivor = Collector()
            await bus.subscribe(topic, survivor, consumer_group="crash")
            await survivor.wait_count(1, ack_wait + WAIT)
            assert survivor.payloads == ["survive"]
            assert survivor.messages[0].attempt == 2  # JetStream counted the lost delivery
            assert time.monotonic() - killed_at < ack_wait + 3.0
    finally:
        if member.returncode is None:
            member.kill()
            await member.wait()


async def test_unsubscribed_member_leaves_nothing_behind(topic: str) -> None:
    """A member that leaves naks what it held; a long ack_wait must not delay the next one."""
    broker_options = {"ack_wait": 60.0}
    async with AgentMessageBus(broker=js_broker(**broker_options)) as first:
        sub = await first.subscribe(topic, Collector(), consumer_group="handover")
        await sub.unsubscribe()
        for i in range(20):
            await first.publish(Message(topic=topic, payload=i))
    async with AgentMessageBus(broker=js_broker(**broker_options)) as second:
        late = Collector()
        await second.subscribe(topic, late, consumer_group="handover")
        await late.wait_for(lambda: set(late.payloads) == set(range(20)), 3.0)


# --- JetStream publish: ack, dedup, pipelining, window ----------------------------------------


async def test_publish_dedup_by_message_id(topic: str) -> None:
    async with AgentMessageBus(broker=js_broker()) as bus:
        msg = Message(topic=topic, payload="once")
        await bus.publish(msg)
        await bus.publish(msg)  # a retry of the same message: stored once
        await bus.publish(msg.copy(topic=f"{topic}.other"))  # same id elsewhere: stored
        assert [m.payload async for m in bus.replay(topic)] == ["once"]
        assert [m.payload async for m in bus.replay(f"{topic}.other")] == ["once"]


async def test_concurrent_publishes_pipeline_their_acks(topic: str) -> None:
    broker = js_broker()
    peak = 0
    async with AgentMessageBus(broker=broker) as bus:
        await bus.publish(Message(topic=topic, payload=-1))  # stream ready

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(broker._js.acks))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(bus.publish(Message(topic=topic, payload=i))
                               for i in range(500)))
        watcher.cancel()
        assert peak > 50, f"at most {peak} acks were outstanding at once: not pipelined"
        stored = [m.payload async for m in bus.replay(topic)]
        assert sorted(stored) == list(range(-1, 500))


def all_threads_stopped(pid: int) -> bool:
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                return False
    return True


async def stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel reports every thread of the process stopped (SIGSTOP is delivered
    asynchronously, thread by thread)."""
    deadline = time.monotonic() + timeout
    while not all_threads_stopped(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout}s")
        await asyncio.sleep(0.005)


async def test_unacknowledged_publish_times_out_and_nothing_is_left_waiting(
    private_nats: PrivateNATS,
) -> None:
    """A server that takes the publishes but never answers (stopped with SIGSTOP): every
    publish raises TimeoutError after publish_timeout, each once, and no ack stays pending."""
    broker = js_broker(private_nats.url, publish_timeout=0.5)
    async with AgentMessageBus(broker=broker) as bus:
        await bus.publish(Message(topic="frozen.x", payload=0))  # stream exists, server answers
        assert private_nats.process is not None
        private_nats.process.send_signal(signal.SIGSTOP)
        try:
            await stopped(private_nats.process.pid)
            started = time.monotonic()
            results = await asyncio.gather(
                *(bus.publish(Message(topic="frozen.x", payload=i)) for i in range(20)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        finally:
            private_nats.process.send_signal(signal.SIGCONT)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.4 < elapsed < 3.0
        assert not broker._js.acks and not len(broker._js.deadlines)
        await bus.publish(Message(topic="frozen.x", payload="after"))  # and it recovers


async def test_max_pending_acks_window(topic: str) -> None:
    broker = js_broker(max_pending_acks=100)
    async with AgentMessageBus(broker=broker) as bus:
        for i in range(1000):
            await bus.publish(Message(topic=topic, payload=i))
        await broker.flush()
        assert not broker._js.acks
        assert [m.payload async for m in bus.replay(topic)] == list(range(1000))


# --- replay ----------------------------------------------------------------------------------


async def test_replay_patterns_and_empty(topic: str) -> None:
    async with AgentMessageBus(broker=js_broker()) as bus:
        started = time.monotonic()
        assert [m async for m in bus.replay(f"{topic}.empty")] == []
        assert time.monotonic() - started < 2.0
        for name in ("a", "b", "a"):
            await bus.publish(Message(topic=f"{topic}.{name}.x", payload=name))
        assert [m.payload async for m in bus.replay(f"{topic}.*.x")] == ["a", "b", "a"]
        assert [m.payload async for m in bus.replay(f"{topic}.a.>")] == ["a", "a"]
        positions = [m.position async for m in bus.replay(f"{topic}.>")]
        assert positions == sorted(positions) and len(set(positions)) == 3


async def test_core_mode_has_no_replay(core_topic: str) -> None:
    topic = core_topic
    async with AgentMessageBus(broker=NATSBroker(servers=[URL])) as bus:
        with pytest.raises(UnsupportedFeature):
            [m async for m in bus.replay(topic)]


# --- reconnect: JetStream loses nothing --------------------------------------------------------


async def test_jetstream_restart_mid_stream_loses_nothing(private_nats: PrivateNATS) -> None:
    topic = f"rc.{uuid.uuid4().hex[:8]}"
    got = Collector()
    release = asyncio.Event()

    async def slowish(msg: Message) -> None:
        await got(msg)
        if len(got.messages) == 50:
            await release.wait()  # hold here while the server restarts

    broker = js_broker(private_nats.url, ack_wait=2.0, reconnect_time_wait=0.2)
    async with AgentMessageBus(broker=broker) as bus:
        await bus.subscribe(topic, slowish, consumer_group="keep")
        for i in range(200):
            await bus.publish(Message(topic=topic, payload=i))
        await got.wait_count(50, WAIT)
        await private_nats.restart()
        release.set()
        deadline = time.monotonic() + 3 * WAIT
        sent_after = []
        i = 200
        while len(sent_after) < 50:
            try:
                await bus.publish(Message(topic=topic, payload=i))
                sent_after.append(i)
                i += 1
            except (ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "publishing never resumed"
                await asyncio.sleep(0.2)
        expected = set(range(200)) | set(sent_after)
        await got.wait_for(lambda: set(got.payloads) >= expected, 3 * WAIT)


@pytest.mark.parametrize("jetstream", [False, True])
async def test_subscribe_is_live_at_the_server_when_it_returns(
    core_topic: str, jetstream: bool
) -> None:
    """nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still in
    the client's pending buffer: a PONG after a SUB that had not been written yet proved
    nothing, and another connection's publish could reach the server before the SUB (the lost
    first message of ``test_foreign_and_malformed_input``). The SUB must go out before the PING
    whose PONG ``subscribe`` waits for."""
    broker = NATSBroker(servers=[URL], use_jetstream=jetstream)
    await broker.connect()
    try:
        nc = broker._nc
        assert nc is not None
        transport = nc._transport
        assert transport is not None
        wire: list[bytes] = []
        write, writelines = transport.write, transport.writelines

        def record(data: bytes) -> None:
            wire.append(bytes(data))
            write(data)

        def record_lines(lines: list[bytes]) -> None:
            wire.extend(bytes(line) for line in lines)
            writelines(lines)

        transport.write = record  # type: ignore[method-assign]
        transport.writelines = record_lines  # type: ignore[method-assign]
        try:
            async def handler(delivery: Any) -> None:
                pass

            sub = await broker.subscribe(core_topic, handler)
        finally:
            del transport.write, transport.writelines
        commands = [line.split(b" ", 1)[0].strip() for chunk in wire
                    for line in chunk.split(b"\r\n") if line]
        assert b"SUB" in commands and b"PING" in commands, commands
        last_ping = max(i for i, command in enumerate(commands) if command == b"PING")
        assert commands.index(b"SUB") < last_ping, (
            f"subscribe() waited for a PONG to a PING sent before its SUB: {commands}"
        )
        await sub.close()

        # And end to end: a foreign publisher's first message right after subscribe() arrives.
        import nats

        foreign = await nats.connect(URL)
        try:
            for i in range(20):
                got: asyncio.Queue[bytes] = asyncio.Queue()

                async def collect(delivery: Any, got: asyncio.Queue[bytes] = got) -> None:
                    got.put_nowait(delivery.body)

                sub = await broker.subscribe(f"{core_topic}.{i}", collect)
                await foreign.publish(f"{core_topic}.{i}", b"first")
                assert await asyncio.wait_for(got.get(), WAIT) == b"first"
                await sub.close()
        finally:
            await foreign.close()
    finally:
        await broker.close()


# --- the fast path: tested nats-py versions only ------------------------------------------------


def test_fast_path_allow_list() -> None:
    from nats.aio.client import Client

    from amb_core.adapters.nats import _fast

    nc = Client()
    assert _fast.client_version().rsplit(".", 1)[0] in _fast.TESTED, "a version not tested"
    assert _fast.why_not(nc) is None
    assert _fast.why_not(nc, "2.16.3") is None  # patch releases of a tested minor
    reason = _fast.why_not(nc, "3.0.0")
    assert reason is not None and "3.0.0" in reason and "2.16" in reason


async def test_untested_nats_py_gets_the_public_api(
    core_topic: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from amb_core.adapters.nats import _fast

    monkeypatch.setattr(_fast, "client_version", lambda: "9.1.0")
    caplog.set_level(logging.INFO, logger="amb_core.adapters.nats")
    broker = NATSBroker(servers=[URL])
    async with AgentMessageBus(broker=broker) as bus:
        assert not broker._fast
        assert broker._nc is not None and not isinstance(broker._nc._ps, _fast.FastParser)
        got = Collector()
        await bus.subscribe(core_topic, got)
        await bus.publish(Message(topic=core_topic, payload="public"))
        await got.wait_count(1, WAIT)
    assert "fast path off: nats-py 9.1.0 is not a version" in caplog.text


# --- the caller's headers, consumer groups' state -----------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False])
async def test_jetstream_request_leaves_the_headers_alone(topic: str, fast_path: bool) -> None:
    """The inbox a JetStream request carries for a group member is the adapter's own header,
    written without touching the caller's dict, and stripped before the bus sees it."""
    seen: list[dict[str, str]] = []
    server, client = js_broker(fast_path=fast_path), js_broker(fast_path=fast_path)
    await server.connect()
    await client.connect()
    try:
        async def serve(delivery: Any) -> None:
            seen.append(dict(delivery.headers))
            assert delivery.reply_to is not None
            await server.send_reply(delivery.reply_to, b"pong", {})
            await delivery.ack()

        await server.subscribe(topic, serve, group="rpc")
        headers = {"x-app": "ping", "ce-id": "r-1"}
        reply = await client.request(topic, b"ping", headers, timeout=WAIT)
        assert reply.body == b"pong"
        assert headers == {"x-app": "ping", "ce-id": "r-1"}
        assert seen == [{"x-app": "ping", "ce-id": "r-1"}]  # no Nats-Msg-Id, no Amb-Reply-To
    finally:
        await client.close()
        await server.close()


async def test_delete_group_removes_the_durable_consumer(topic: str) -> None:
    from nats.js.errors import NotFoundError

    broker = js_broker()
    async with AgentMessageBus(broker=broker) as bus:
        sub = await bus.subscribe(topic, Collector(), consumer_group="doomed")
        await sub.unsubscribe()
        assert broker._js is not None
        stream = await broker._js.stream_for(topic)
        name = broker._js.consumer_name("doomed", topic)
        js = broker._js.api()
        await js.consumer_info(stream, name)  # there
        await broker.delete_group(topic, "doomed")
        with pytest.raises(NotFoundError):
            await js.consumer_info(stream, name)
        await broker.delete_group(topic, "doomed")  # gone already: not an error


async def test_core_groups_have_nothing_to_delete(core_topic: str) -> None:
    broker = NATSBroker(servers=[URL])
    await broker.connect()
    try:
        with pytest.raises(UnsupportedFeature, match="keep no state"):
            await broker.delete_group(core_topic, "g")
        await broker.keep_dead_letters(core_topic)  # core NATS keeps nothing: a no-op
        with pytest.raises(UnsupportedFeature):
            broker.dead_letters(core_topic)
    finally:
        await broker.close()


async def test_a_kept_dead_letter_topic_is_marked_on_the_server(topic: str) -> None:
    """Another process that never kept the topic still starts a new group at its oldest
    letter: the mark is a consumer on the server, not a flag in this process."""
    dlq = f"{topic}.dlq"
    keeper = js_broker()
    await keeper.connect()
    try:
        await keeper.keep_dead_letters(dlq)
        for i in range(3):
            await keeper.publish(dlq, b"%d" % i, {})
    finally:
        await keeper.close()
    reader = js_broker()  # group_start="new" by default
    await reader.connect()
    try:
        got: list[bytes] = []
        three = asyncio.Event()

        async def take(delivery: Any) -> None:
            got.append(delivery.body)
            await delivery.ack()
            if len(got) == 3:
                three.set()

        await reader.subscribe(dlq, take, group="operators")
        await asyncio.wait_for(three.wait(), WAIT)
        assert got == [b"0", b"1", b"2"]
        # An ordinary topic still starts a new group at new messages.
        await reader.publish(f"{topic}.plain", b"old", {})
        late: list[bytes] = []
        new = asyncio.Event()

        async def record(delivery: Any) -> None:
            late.append(delivery.body)
            await delivery.ack()
            if delivery.body == b"new":
                new.set()

        await reader.subscribe(f"{topic}.plain", record, group="fresh")
        await reader.publish(f"{topic}.plain", b"new", {})
        await asyncio.wait_for(new.wait(), WAIT)
        assert late == [b"new"]  # in stream order: "old" would have come first
    finally:
        await reader.close()


async def test_one_stream_that_misses_the_dead_letter_topic_says_so_at_subscribe() -> None:
    """With ``stream=`` the dead-letter topic must be one of its subjects: the subscription
    that would dead-letter there fails at once, not its first dead letter later."""
    require_server("nats", HOST, PORT)
    name = f"AMBTEST_{uuid.uuid4().hex[:8]}"
    broker = js_broker(stream=name, stream_subjects=[f"{name}.>"])
    async with AgentMessageBus(broker=broker) as bus:
        try:
            await bus.subscribe(f"{name}.work", Collector(), consumer_group="g",
                                dead_letter_topic=f"{name}.dlq")  # captured: fine
            with pytest.raises(UnsupportedFeature, match="add it to stream_subjects"):
                await bus.subscribe(f"{name}.work", Collector(), consumer_group="g")
        finally:
            assert broker._js is not None
            await broker._js.api().delete_stream(name)

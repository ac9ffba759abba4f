"""The adapter runtime's pieces on their own (amb_core.runtime), without any broker."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from amb_core.errors import BrokerConnectionError, NotConnected, RequestTimeout
from amb_core.runtime import (
    AckBatcher,
    Backoff,
    Buffer,
    DropReport,
    ErrorMap,
    LeaseKeeper,
    OnDemand,
    PendingReplies,
    Pump,
    ReconnectPolicy,
    Supervisor,
)

# --- Buffer ----------------------------------------------------------------------------------


async def test_buffer_is_fifo_bounded_and_put_waits_for_room() -> None:
    buffer: Buffer[int] = Buffer(2)
    assert buffer.offer(1) and buffer.offer(2)
    assert not buffer.offer(3) and buffer.full
    blocked = asyncio.ensure_future(buffer.put(3))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert buffer.poll() == 1
    await asyncio.wait_for(blocked, 1)
    assert [buffer.poll(), buffer.poll(), buffer.poll()] == [2, 3, None]


async def test_buffer_readers_that_yield_share_the_items() -> None:
    buffer: Buffer[int] = Buffer(100)
    taken: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    async def reader(name: str) -> None:
        while True:
            item = buffer.poll()
            if item is None:
                item = await buffer.get()
            taken[name].append(item)  # a handler that never suspends
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(reader(n)) for n in taken]
    await asyncio.sleep(0)  # all three wait
    for i in range(30):
        assert buffer.offer(i)
    for _ in range(50):
        await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    assert sorted(item for items in taken.values() for item in items) == list(range(30))
    assert all(len(items) >= 5 for items in taken.values()), taken


# --- Pump and the slow-consumer report --------------------------------------------------------


async def test_pump_delivers_in_order_and_put_applies_backpressure() -> None:
    got: list[int] = []
    release, four = asyncio.Event(), asyncio.Event()

    async def deliver(item: int) -> None:
        await release.wait()
        got.append(item)
        if len(got) == 4:
            four.set()

    pump: Pump[int] = Pump(deliver, max_items=2, name="t")
    for i in range(3):  # one in the worker's hands, two buffered
        await asyncio.wait_for(pump.put(i), 1)
    blocked = asyncio.ensure_future(pump.put(3))
    await asyncio.sleep(0.01)
    assert not blocked.done(), "put did not wait for room"
    release.set()
    await asyncio.wait_for(blocked, 1)
    await asyncio.wait_for(four.wait(), 1)
    assert got == [0, 1, 2, 3]
    await pump.close()


async def test_pump_offer_drops_when_full_with_one_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = asyncio.Event()

    async def deliver(item: int) -> None:
        await stuck.wait()

    pump: Pump[int] = Pump(deliver, max_items=3, name="slow.topic", hint="use a group")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="amb_core.runtime"):
        accepted = [pump.offer(i) for i in range(10)]
    await pump.close()
    assert accepted.count(True) == 3
    assert pump.dropped == 7
    warnings = [r for r in caplog.records if "slow consumer on slow.topic" in r.getMessage()]
    assert len(warnings) == 1, "the report must not warn per dropped message"
    assert "use a group" in warnings[0].getMessage()


async def test_pump_byte_bound() -> None:
    stuck = asyncio.Event()

    async def deliver(item: bytes) -> None:
        await stuck.wait()

    pump: Pump[bytes] = Pump(deliver, max_items=100, max_bytes=10, name="bytes")
    await asyncio.sleep(0)
    assert pump.offer(b"x" * 6, 6)  # taken by the worker
    await asyncio.sleep(0)
    assert pump.offer(b"x" * 6, 6)
    assert pump.offer(b"x" * 6, 6)
    assert not pump.offer(b"x", 1)
    assert pump.dropped == 1
    await pump.close()


async def test_pump_survives_a_failing_deliver(caplog: pytest.LogCaptureFixture) -> None:
    got: list[int] = []
    last = asyncio.Event()

    async def deliver(item: int) -> None:
        if item == 1:
            raise RuntimeError("bug below the bus")
        got.append(item)
        if item == 2:
            last.set()

    pump: Pump[int] = Pump(deliver, max_items=10, name="t")
    for i in range(3):
        await pump.put(i)
    await asyncio.wait_for(last.wait(), 1)
    assert got == [0, 2]
    assert any("failed below the bus" in r.getMessage() for r in caplog.records)
    await pump.close()


def test_drop_report_repeats_at_most_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    report = DropReport("x", interval=0.05)
    with caplog.at_level(logging.WARNING, logger="amb_core.runtime"):
        for _ in range(5):
            report.dropped_one()
        time.sleep(0.06)
        report.dropped_one()
    texts = [r.getMessage() for r in caplog.records]
    assert len(texts) == 2
    assert "1 message(s) dropped (1 in all" in texts[0]
    assert "5 message(s) dropped (6 in all" in texts[1]


# --- Deadlines and pending replies ------------------------------------------------------------


async def test_pending_replies_resolve_time_out_and_refuse_late_replies() -> None:
    pending: PendingReplies[str, str] = PendingReplies()
    fast = pending.expect("a", 5.0, "'fast'")
    slow = pending.expect("b", 0.05, "'slow'")
    assert pending.resolve("a", "answer")
    assert await fast == "answer"
    with pytest.raises(RequestTimeout, match=r"no reply to 'slow' within 0\.05s"):
        await slow
    assert "b" not in pending
    assert not pending.resolve("b", "late"), "a late reply must be refused"
    assert len(pending) == 0


async def test_pending_replies_fail_all() -> None:
    pending: PendingReplies[int, str] = PendingReplies()
    futures = [pending.expect(i, 5.0, "x") for i in range(3)]
    pending.fail_all(NotConnected("closed"))
    for future in futures:
        with pytest.raises(NotConnected):
            await future
    assert len(pending) == 0


async def test_many_deadlines_share_one_timer() -> None:
    pending: PendingReplies[int, None] = PendingReplies()
    futures = [pending.expect(i, 0.01 + i * 0.001, "x") for i in range(200)]
    loop = asyncio.get_running_loop()
    timers = len(loop._scheduled)  # type: ignore[attr-defined]
    assert timers < 10, "each request got a timer of its own"
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, RequestTimeout) for r in results)


# --- Supervisor -------------------------------------------------------------------------------


class FakeConnection:
    """Stands in for a client connection: the supervisor's contract is only its callbacks."""

    def __init__(self, refuse_first: int = 0) -> None:
        self.refuse = refuse_first
        self.opens = 0
        self.lost = asyncio.Event()
        self.restored: list[int] = []

    async def open(self) -> None:
        self.opens += 1
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused")
        self.lost = asyncio.Event()
        self.restored.append(self.opens)

    async def until_lost(self) -> None:
        await self.lost.wait()
        raise ConnectionResetError("reset by peer")


async def test_supervisor_first_connect_failure_is_a_broker_connection_error() -> None:
    conn = FakeConnection(refuse_first=1)
    supervisor = Supervisor("fake at x", open=conn.open, until_lost=conn.until_lost)
    with pytest.raises(BrokerConnectionError, match="cannot connect to fake at x"):
        await supervisor.start()


async def test_supervisor_reconnects_with_backoff_and_restores(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = FakeConnection()
    lost: list[BaseException | None] = []
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, jitter=0.0)
    supervisor = Supervisor("fake", open=conn.open, until_lost=conn.until_lost,
                            on_lost=lost.append, policy=policy)
    await supervisor.start()
    assert supervisor.ready.is_set()
    with caplog.at_level(logging.INFO, logger="amb_core.runtime"):
        conn.refuse = 2
        conn.lost.set()
        await asyncio.sleep(0)
        assert not supervisor.ready.is_set()
        await supervisor.wait_ready(2.0)
    assert conn.opens == 4  # the first, two refused, the one that worked
    assert conn.restored == [1, 4]
    assert isinstance(lost[0], ConnectionResetError)
    assert supervisor.reconnects == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("lost the connection to fake" in m for m in messages)
    assert any("reconnected to fake after 3 attempt(s)" in m for m in messages)
    await supervisor.close()
    with pytest.raises(NotConnected):
        await supervisor.wait_ready(0.1)


async def test_supervisor_wait_ready_is_bounded() -> None:
    conn = FakeConnection()
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.01)
    supervisor = Supervisor("fake", open=conn.open, until_lost=conn.until_lost, policy=policy)
    await supervisor.start()
    conn.refuse = 10_000
    conn.lost.set()
    await asyncio.sleep(0)
    with pytest.raises(BrokerConnectionError, match="still reconnecting"):
        await supervisor.wait_ready(0.1)
    await supervisor.close()


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(ReconnectPolicy(initial_delay=0.1, max_delay=1.0, jitter=0.0))
    assert [round(backoff.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittery = ReconnectPolicy(initial_delay=1.0, max_delay=1.0, jitter=0.2).backoff()
    delays = [jittery.next_delay() for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays) and len(set(delays)) > 100
    limited = ReconnectPolicy(max_attempts=2).backoff()
    limited.next_delay()
    assert not limited.exhausted
    limited.next_delay()
    assert limited.exhausted
    with pytest.raises(ValueError):
        ReconnectPolicy(initial_delay=2.0, max_delay=1.0)


# --- LeaseKeeper ------------------------------------------------------------------------------


async def test_lease_keeper_renews_only_what_is_still_held() -> None:
    renewed: list[list[str]] = []
    twice = asyncio.Event()

    async def renew(keys: list[str]) -> None:
        renewed.append(sorted(keys))
        if len(renewed) == 2:
            twice.set()

    keeper: LeaseKeeper[str] = LeaseKeeper(renew, renew_after=0.04, name="t")
    keeper.hold("slow")
    keeper.hold("quick")
    assert keeper.release("quick") and not keeper.release("quick")
    await asyncio.wait_for(twice.wait(), 2)
    assert renewed[:2] == [["slow"], ["slow"]]
    assert keeper.release_all() == ["slow"]
    count = len(renewed)
    await asyncio.sleep(0.1)
    assert len(renewed) == count, "a released lease was renewed"
    await keeper.close()


async def test_lease_keeper_retries_after_a_failed_renewal() -> None:
    calls = 0
    renewed = asyncio.Event()

    async def renew(keys: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("flaky")
        renewed.set()

    keeper: LeaseKeeper[int] = LeaseKeeper(renew, renew_after=0.02, name="t")
    keeper.hold(1)
    await asyncio.wait_for(renewed.wait(), 2)
    await asyncio.sleep(0)  # the keeper counts the renewal after renew() returns
    assert calls >= 2 and keeper.renewals >= 1
    await keeper.close()


# --- AckBatcher -------------------------------------------------------------------------------


async def test_ack_batcher_sends_one_batch_per_turn_in_order() -> None:
    batches: list[list[int]] = []
    batcher: AckBatcher[int] = AckBatcher(batches.append, name="t")
    for tag in range(5):
        batcher.add(tag)
    assert batches == []  # not before the end of the turn
    await asyncio.sleep(0)
    assert batches == [[0, 1, 2, 3, 4]]
    batcher.add(5)
    await batcher.flush()
    assert batches == [[0, 1, 2, 3, 4], [5]]


async def test_ack_batcher_cuts_batches_and_never_overlaps_async_sends() -> None:
    batches: list[list[int]] = []
    in_send = 0
    overlap = False

    async def send(batch: list[int]) -> None:
        nonlocal in_send, overlap
        in_send += 1
        overlap = overlap or in_send > 1
        await asyncio.sleep(0.005)
        batches.append(batch)
        in_send -= 1

    batcher: AckBatcher[int] = AckBatcher(send, name="t", max_batch=10)
    for tag in range(25):
        batcher.add(tag)
    await asyncio.sleep(0)
    batcher.add(25)  # while the first batches are being sent
    await batcher.flush()
    assert not overlap
    assert batches == [list(range(10)), list(range(10, 20)), list(range(20, 25)), [25]]
    await batcher.close()
    batcher.add(99)
    await asyncio.sleep(0.01)
    assert [99] not in batches


# --- ErrorMap and OnDemand -------------------------------------------------------------------


class ClientConnectionError(Exception):
    pass


async def test_error_map_translates_once_and_passes_the_rest() -> None:
    errors = ErrorMap("Fake at x", lambda: [(ClientConnectionError, BrokerConnectionError)])
    with pytest.raises(BrokerConnectionError, match="Fake at x: publish failed: gone") as info, \
            errors.mapped("publish"):
        raise ClientConnectionError("gone")
    assert isinstance(info.value.__cause__, ClientConnectionError)
    with pytest.raises(KeyError), errors.mapped("publish"):
        raise KeyError("a bug stays a bug")
    own = NotConnected("ours")
    assert errors.translate(own, "x") is own


async def test_on_demand_opens_once_for_racing_callers() -> None:
    opened = 0

    async def open_inbox() -> str:
        nonlocal opened
        opened += 1
        await asyncio.sleep(0.01)
        return f"inbox-{opened}"

    inbox: OnDemand[str] = OnDemand(open_inbox)
    results = await asyncio.gather(*(inbox.get() for _ in range(10)))
    assert results == ["inbox-1"] * 10 and opened == 1
    inbox.reset()
    assert await inbox.get() == "inbox-2"


async def test_pending_replies_refuse_a_second_wait_on_one_key_and_discard_cancels() -> None:
    pending: PendingReplies[str, str] = PendingReplies()
    future = pending.expect("k", 5.0, "x")
    with pytest.raises(ValueError, match="already waiting"):
        pending.expect("k", 5.0, "x")
    pending.discard("k")
    assert future.cancelled(), "a discarded request's future is cancelled, not left to time out"


async def test_a_closed_lease_keeper_stays_closed() -> None:
    async def renew(keys: list[int]) -> None:
        return None

    keeper: LeaseKeeper[int] = LeaseKeeper(renew, renew_after=1.0, name="t")
    keeper.hold(1)
    await keeper.close()
    with pytest.raises(RuntimeError, match="closed"):
        keeper.hold(2)


async def test_supervisor_survives_an_unexpected_error_while_watching(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = FakeConnection()
    calls = 0

    async def until_lost() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug below")
        await asyncio.Event().wait()

    supervisor = Supervisor("fake", open=conn.open, until_lost=until_lost,
                            policy=ReconnectPolicy(initial_delay=0.01, max_delay=0.01))
    await supervisor.start()
    await asyncio.sleep(0)
    await supervisor.wait_ready(2.0)
    assert conn.opens == 2, "the supervisor did not reconnect after the unexpected error"
    assert any("watching the connection to fake failed" in r.getMessage() for r in caplog.records)
    await supervisor.close()


async def test_supervisor_that_gave_up_fails_wait_ready_at_once() -> None:
    conn = FakeConnection()
    policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.01, max_attempts=2)
    supervisor = Supervisor("fake", open=conn.open, until_lost=conn.until_lost, policy=policy)
    await supervisor.start()
    conn.refuse = 10
    conn.lost.set()
    for _ in range(100):
        if supervisor.gave_up:
            break
        await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError, match="gave up"):
        await supervisor.wait_ready(5.0)
    assert time.monotonic() - started < 1.0
    await supervisor.close()


async def test_ack_batcher_close_is_bounded_by_a_stuck_send() -> None:
    async def stuck(batch: list[int]) -> None:
        await asyncio.Event().wait()

    batcher: AckBatcher[int] = AckBatcher(stuck, name="t")
    batcher.add(1)
    await asyncio.sleep(0)
    started = time.monotonic()
    await batcher.close(timeout=0.1)
    assert time.monotonic() - started < 1.0

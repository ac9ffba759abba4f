"""The RabbitMQ adapter's fast path against aiormq's own code.

- :class:`AckRun` (which ``basic.ack`` frames acknowledge a turn's tags) against a model of the
  broker: no frame names a tag the broker no longer holds (RabbitMQ closes the channel on an
  unknown delivery tag), and the broker ends up with exactly the tags the bus acknowledged.
- The fast ack writer (``_fast.FastAckWriter``: frames marshalled by hand onto the channel's
  write queue) against aiormq's public ``channel.basic_ack``: the same bytes on the wire for
  the same acks, for random ack orders split into random turns, directly and through the
  :class:`AckBatcher` the subscriptions use.
- The allow-list of tested aiormq versions.

The differential cases need a real channel (the shared RabbitMQ on 127.0.0.1:5672); nothing is
sent on it: its write queue is swapped for one the test reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import require_server
from tests.test_contract_rabbitmq import HOST, PORT, URL

from amb_core.adapters.rabbitmq import _fast
from amb_core.adapters.rabbitmq.subscriptions import AckRun, ack_sender
from amb_core.runtime import AckBatcher


@st.composite
def ack_turns(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    """``count`` delivered tags; the acknowledged ones in a random order, cut into turns."""
    count = draw(st.integers(min_value=1, max_value=40))
    acked = draw(st.permutations(range(1, count + 1)))
    acked = acked[: draw(st.integers(min_value=0, max_value=count))]
    turns: list[list[int]] = []
    index = 0
    while index < len(acked):
        size = draw(st.integers(min_value=1, max_value=len(acked) - index))
        turns.append(list(acked[index:index + size]))
        index += size
    return count, turns


@given(ack_turns())
def test_ack_frames_name_only_held_tags_and_ack_exactly_the_acknowledged(
    case: tuple[int, list[list[int]]],
) -> None:
    count, turns = case
    held = set(range(1, count + 1))  # what the broker holds unacknowledged
    acknowledged: set[int] = set()  # what the bus acknowledged
    run = AckRun()
    for tags in turns:
        acknowledged.update(tags)
        top = run.plan(tags)
        if top:
            assert top in held, f"multiple ack of {top}, which the broker no longer holds"
            covered = {tag for tag in held if tag <= top}
            assert covered <= acknowledged, f"ack {top} multiple covers {covered - acknowledged}"
            held -= covered
        else:
            for tag in tags:
                assert tag in held, f"ack of {tag}, which the broker no longer holds"
                held.discard(tag)
    assert held == set(range(1, count + 1)) - acknowledged


def test_only_tested_aiormq_versions_switch_the_fast_path_on() -> None:
    assert "7.2" in _fast.TESTED
    assert _fast.enabled(True, "7.2.4")
    assert not _fast.enabled(False, "7.2.4")
    assert not _fast.enabled(True, "7.3.0")
    assert not _fast.enabled(True, "6.9.4")  # not run here: 3.10 uses the public API
    assert not _fast.enabled(True, "8.0")


# --- the same bytes as aiormq's own basic_ack --------------------------------------------------


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    require_server("rabbitmq", HOST, PORT)
    import aiormq

    connection = await aiormq.connect(URL)
    try:
        channel = await connection.channel()
        yield channel
    finally:
        await connection.close()


async def _captured(channel: Any, write: Callable[[], Awaitable[None]]) -> bytes:
    """The bytes ``write()`` puts on the channel's write queue; frames are drained as aiormq's
    writer would (so ``basic_ack``'s wait for the drain returns)."""
    original = channel.write_queue
    queue: asyncio.Queue[Any] = asyncio.Queue()
    channel.write_queue = queue
    payloads: list[bytes] = []

    async def drain() -> None:
        while True:
            frame = await queue.get()
            payloads.append(frame.payload)
            frame.drain()
            queue.task_done()

    drainer = asyncio.ensure_future(drain())
    try:
        await asyncio.wait_for(write(), 10)
        await asyncio.wait_for(queue.join(), 10)
    finally:
        drainer.cancel()
        channel.write_queue = original
    return b"".join(payloads)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(case=ack_turns())
async def test_fast_ack_frames_are_the_bytes_basic_ack_writes(
    channel: Any, case: tuple[int, list[list[int]]]
) -> None:
    _, turns = case

    async def fast() -> None:
        run, writer = AckRun(), _fast.FastAckWriter(channel)
        for tags in turns:
            pending = writer.write(tags, run.plan(tags))
            if pending is not None:
                await pending

    async def public() -> None:
        run = AckRun()
        for tags in turns:
            await _fast.public_ack(channel, tags, run.plan(tags))

    assert await _captured(channel, fast) == await _captured(channel, public)


@SETTINGS
@given(case=ack_turns())
async def test_ack_batchers_fast_and_public_write_the_same_bytes(
    channel: Any, case: tuple[int, list[list[int]]]
) -> None:
    _, turns = case

    def through(fast: bool) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            acks: AckBatcher[int] = AckBatcher(ack_sender(channel, fast), name="test")
            for tags in turns:
                for tag in tags:
                    acks.add(tag)
                await acks.flush()  # one turn's acks, one batch
            await acks.close()
        return write

    fast_bytes = await _captured(channel, through(True))
    assert fast_bytes == await _captured(channel, through(False))
    assert bool(fast_bytes) == bool(turns)

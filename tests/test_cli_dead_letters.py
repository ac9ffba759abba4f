"""`amb dead-letters list|redrive` against a real broker that keeps dead letters (Redis)."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from tests.conftest import require_server

from amb_core import AgentMessageBus, Message, RetryPolicy
from amb_core.adapters import RedisBroker
from amb_core.cli import main

URL = "redis://127.0.0.1:6379/0"


async def dead_letter_two(topic: str, dlq: str) -> None:
    async with AgentMessageBus(broker=RedisBroker(URL), observer=False) as bus:
        async def fail(msg: Message) -> None:
            raise LookupError(f"no {msg.payload}")

        await bus.subscribe(topic, fail, consumer_group="cli", dead_letter_topic=dlq,
                            retry=RetryPolicy(max_attempts=1))
        for payload in ("first", "second"):
            await bus.publish(Message(topic=topic, payload=payload))
        for _ in range(200):
            if len(await bus.dead_letters(dlq)) == 2:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the two messages were not dead-lettered")


async def drain(topic: str) -> list[Message]:
    got: list[Message] = []
    done = asyncio.Event()
    async with AgentMessageBus(broker=RedisBroker(URL), observer=False) as bus:
        async def take(msg: Message) -> None:
            got.append(msg)
            if len(got) == 2:
                done.set()

        await bus.subscribe(topic, take, consumer_group="cli")
        await asyncio.wait_for(done.wait(), 10)
    return got


def test_dead_letters_list_and_redrive_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_server("redis", "127.0.0.1", 6379)
    topic = f"cli.{uuid.uuid4().hex[:10]}.jobs"
    dlq = f"{topic}.dlq"
    asyncio.run(dead_letter_two(topic, dlq))

    assert main(["dead-letters", "list", dlq, "--url", URL]) == 0
    out, err = capsys.readouterr()
    records = [orjson.loads(line) for line in out.splitlines()]
    assert [r["original_topic"] for r in records] == [topic, topic]
    assert [r["error_type"] for r in records] == ["LookupError", "LookupError"]
    assert [r["error_message"] for r in records] == ["no first", "no second"]
    assert all(r["attempts"] == 1 and r["time"] and r["id"] for r in records)
    assert f"2 dead letter(s) at {dlq}" in err

    assert main(["dead-letters", "redrive", dlq, "--url", URL]) == 0
    out, _ = capsys.readouterr()
    assert f"redriven 2 dead letter(s) from {dlq}" in out
    assert "removed 2" in out
    redriven = asyncio.run(drain(topic))
    assert sorted(m.payload for m in redriven) == ["first", "second"]
    assert all(m.attempt == 1 for m in redriven)

    assert main(["dead-letters", "list", dlq, "--url", URL]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"0 dead letter(s) at {dlq}" in err


def test_dead_letters_on_a_broker_that_keeps_none_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_server("nats", "127.0.0.1", 4222)
    assert main(["dead-letters", "list", "some.dlq", "--url", "nats://127.0.0.1:4222"]) == 1
    _, err = capsys.readouterr()
    assert "UnsupportedFeature" in err

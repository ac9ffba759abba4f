"""Logs a user can follow (issue 11): at INFO one line on connect naming the broker, password
masked, and one per subscription; and `amb demo` shows no warning for the dead letter it makes on
purpose, while a real dead letter still warns."""

from __future__ import annotations

import asyncio
import logging
import subprocess

import pytest
from tests.conftest import require_server

from amb_core import AgentMessageBus, Message, RetryPolicy
from amb_core.adapters import MemoryBroker
from amb_core.demo import run_demo
from test_readme_and_cli import amb_command


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "amb_core.bus" and r.levelno == logging.INFO]


class LeakyBroker(MemoryBroker):
    """An adapter whose repr forgot to mask its URL: the bus's log line masks it anyway."""

    def __repr__(self) -> str:
        return "LeakyBroker(url='amqp://agent:s3cret@mq.example:5672/')"


async def test_connect_logs_the_broker_with_the_password_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="amb_core.bus")
    async with AgentMessageBus(LeakyBroker(), observer=False):
        pass
    lines = info_lines(caplog)
    assert lines == ["connected to LeakyBroker(url='amqp://agent:***@mq.example:5672/')"]
    assert "s3cret" not in caplog.text


async def test_subscribe_logs_pattern_and_group(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amb_core.bus")

    async def handler(msg: Message) -> None:
        pass

    async with AgentMessageBus(observer=False) as bus:
        caplog.clear()
        await bus.subscribe("events.>", handler)
        await bus.subscribe("work", handler, consumer_group="workers")
    assert info_lines(caplog) == [
        "subscribed to 'events.>' (no consumer group)",
        "subscribed to 'work' in consumer group 'workers'",
    ]


async def test_connect_line_on_a_real_broker_masks_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_server("rabbitmq", "127.0.0.1", 5672)
    caplog.set_level(logging.INFO, logger="amb_core.bus")
    async with AgentMessageBus.from_url("amqp://guest:guest@127.0.0.1:5672/", observer=False):
        pass
    (line,) = info_lines(caplog)
    assert line.startswith("connected to RabbitMQBroker(url='amqp://guest:***@127.0.0.1:5672/'")
    assert ":guest@" not in caplog.text


async def test_demo_logs_no_warning_for_its_own_dead_letter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    lines: list[str] = []
    outcome = await run_demo("memory://", say=lines.append)
    assert isinstance(outcome["dead_letter"], dict)
    assert any(line.startswith("   dead letter: {'job': 'summarise'}") for line in lines)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_users_dead_letter_still_warns_after_and_during_the_demo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def fail(msg: Message) -> None:
        raise RuntimeError("boom")

    async def user_dead_letter() -> None:
        got = asyncio.Event()

        async def dlq(msg: Message) -> None:
            got.set()

        async with AgentMessageBus(observer=False) as bus:
            await bus.subscribe("user.dlq", dlq)
            await bus.subscribe("user.jobs", fail, dead_letter_topic="user.dlq",
                                retry=RetryPolicy(max_attempts=1))
            await bus.publish(Message(topic="user.jobs", payload=1))
            await asyncio.wait_for(got.wait(), 5)

    await asyncio.gather(run_demo("memory://", say=lambda line: None), user_dead_letter())
    await user_dead_letter()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(w.startswith("dead-lettering") and "user.jobs" in w for w in warnings)


def test_amb_demo_command_shows_no_warning() -> None:
    result = subprocess.run([*amb_command(), "demo"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dead letter: {'job': 'summarise'} after 3 attempts" in result.stdout
    assert "WARNING" not in result.stderr and "dead-lettering" not in result.stderr


def test_amb_verbose_shows_the_info_lines() -> None:
    result = subprocess.run([*amb_command(), "-v", "publish", "t.x", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "INFO amb_core.bus: connected to MemoryBroker(" in result.stderr

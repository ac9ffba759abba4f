"""The command line across processes (issue 11): `amb serve` answers `amb request` from another
process on a real broker; on memory:// the commands say that nothing leaves the process (and
`amb request` fails fast instead of waiting); `amb groups delete` reports what it did or why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from tests.conftest import require_server

from amb_core.adapters import MemoryBroker
from amb_core.cli import main
from test_readme_and_cli import amb_command

BROKERS = {
    "redis": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0"),
    "nats": ("127.0.0.1", 4222, "nats://127.0.0.1:4222"),
}
MEMORY_WARNING = "amb: warning: memory:// is the in-memory broker"
ENV_VARIABLES = ("AMB_URL", "REDIS_URL", "NATS_URL", "RABBITMQ_URL", "AMQP_URL", "KAFKA_SERVERS")


def clean_env() -> dict[str, str]:
    """The test's environment without broker variables: each command names its own --url."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}


@pytest.fixture
def no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def amb(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run one `amb` command to its end (bounded); return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *amb_command(), *args, env=clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Server:
    """`amb serve` in a subprocess, started and known to be subscribed (its ready line)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []

    async def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            line = (await asyncio.wait_for(self.proc.stderr.readline(), remaining)).decode()
            if not line:
                raise AssertionError(f"amb serve ended before {text!r}: {self.stderr}")
            self.stderr.append(line)
            if text in line:
                return line

    async def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), "".join(self.stderr) + err.decode()


@contextlib.asynccontextmanager
async def serving(*args: str) -> AsyncIterator[Server]:
    proc = await asyncio.create_subprocess_exec(
        *amb_command(), "serve", *args, env=clean_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Server(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("broker", "mode", "group"), [
    ("redis", "echo", None),
    ("redis", "reply", None),
    ("nats", "echo", None),
    ("nats", "reply", "servers"),
])
async def test_amb_serve_answers_amb_request_from_another_process(
    broker: str, mode: str, group: str | None
) -> None:
    host, port, url = BROKERS[broker]
    require_server(broker, host, port)
    topic = f"cli.serve.{uuid.uuid4().hex[:12]}"
    options = ["--reply", '{"status": "ok"}'] if mode == "reply" else []
    if group is not None:
        options += ["--group", group]
    async with serving(topic, "--url", url, "--count", "2", *options) as server:
        ready = await server.wait_for_line("serving ")
        assert f"serving {topic} on {url}" in ready
        replies = []
        for payload in ('{"values": [1, 2, 3]}', "plain text"):
            code, out, err = await amb("request", topic, payload, "--url", url,
                                       "--timeout", "20")
            assert code == 0, err
            replies.append(orjson.loads(out))
        code, out, err = await server.finish()
    assert code == 0, err  # --count 2: it stopped by itself after the second request
    if mode == "echo":
        assert [r["payload"] for r in replies] == [{"values": [1, 2, 3]}, "plain text"]
    else:
        assert [r["payload"] for r in replies] == [{"status": "ok"}, {"status": "ok"}]
    served = [orjson.loads(line) for line in out.splitlines()]
    assert [s["payload"] for s in served] == [{"values": [1, 2, 3]}, "plain text"]
    assert all(s["topic"] == topic for s in served)
    # each reply belongs to the request it answers
    assert [r["correlation_id"] for r in replies] == [s["correlation_id"] for s in served]
    assert MEMORY_WARNING not in err


async def test_amb_request_with_nobody_serving_times_out_on_a_real_broker() -> None:
    host, port, url = BROKERS["redis"]
    require_server("redis", host, port)
    code, _, err = await amb("request", f"cli.nobody.{uuid.uuid4().hex[:12]}", "1",
                             "--url", url, "--timeout", "0.3")
    assert code == 1 and "RequestTimeout" in err


async def test_amb_serve_on_memory_warns_and_stops_on_ctrl_c() -> None:
    async with serving("calc", "--url", "memory://") as server:
        await server.wait_for_line(MEMORY_WARNING)
        await server.wait_for_line("serving calc on memory://")
        server.proc.send_signal(signal.SIGINT)
        code, _, _ = await server.finish()
    assert code == 130


def test_amb_request_on_memory_fails_fast(no_broker_env: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["request", "calc", '{"values": [1]}']) == 2  # memory:// by default
    assert time.monotonic() - started < 5  # not the 30 s default timeout
    err = capsys.readouterr().err
    assert "memory://" in err and "only inside this" in err and "nothing in it serves 'calc'" in err
    assert "--url" in err and "amb serve" in err


@pytest.mark.parametrize("command", [
    ["publish", "t", "1"],
    ["subscribe", "t", "--timeout", "0.01"],
])
def test_publish_and_subscribe_on_memory_warn(no_broker_env: None, command: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(command) == 0
    err = capsys.readouterr().err
    assert MEMORY_WARNING in err and "only inside this one amb process" in err


def test_publish_on_a_real_broker_does_not_warn(capsys: pytest.CaptureFixture[str]) -> None:
    host, port, url = BROKERS["redis"]
    require_server("redis", host, port)
    assert main(["publish", f"cli.quiet.{uuid.uuid4().hex[:12]}", "1", "--url", url]) == 0
    captured = capsys.readouterr()
    assert "published 1 message(s)" in captured.out and "warning" not in captured.err


def test_demo_on_memory_does_not_warn(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--url", "memory://"]) == 0
    assert "warning" not in capsys.readouterr().err.lower()


def test_serve_rejects_reply_and_echo_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "calc", "--reply", "1", "--echo"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_groups_delete_on_memory_reports_unsupported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups", "delete", "work", "workers", "--url", "memory://"]) == 1
    captured = capsys.readouterr()
    assert "amb: UnsupportedFeature: MemoryBroker keeps no consumer-group state to delete" in (
        captured.err)
    assert captured.out == ""


def test_groups_delete_prints_what_it_removed(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, str]] = []

    async def delete_group(self: Any, pattern: str, group: str) -> None:
        calls.append((pattern, group))

    monkeypatch.setattr(MemoryBroker, "delete_group", delete_group, raising=False)
    assert main(["groups", "delete", "work", "workers", "--url", "memory://"]) == 0
    assert calls == [("work", "workers")]
    out = capsys.readouterr().out
    assert "deleted consumer group 'workers' of 'work'" in out and "MemoryBroker" in out


def test_groups_delete_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups", "delete", "work", "bad group", "--url", "memory://"]) == 1
    assert "ValueError" in capsys.readouterr().err

"""The README's examples run as written, and the `amb` command works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from amb_core.cli import main
from amb_core.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


BROKER_VARIABLES = ("AMB_URL", "REDIS_URL", "NATS_URL", "RABBITMQ_URL", "AMQP_URL",
                    "KAFKA_SERVERS")


def amb_command(executable: str | None = None) -> list[str]:
    """The `amb` of the interpreter running the tests, never whatever `amb` PATH finds first:
    the console script next to it, else ``python -m amb_core``."""
    python = Path(executable or sys.executable)
    script = python.parent / "amb"
    if script.is_file():
        return [str(script)]
    return [str(python), "-m", "amb_core"]


def test_readme_has_the_guide_examples() -> None:
    assert len(BLOCKS) >= 3
    assert "consumer_group=\"workers\"" in BLOCKS[0]
    assert any("AgentMessageBus.from_env(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_blocks_run(index: int) -> None:
    code = BLOCKS[index]
    if "MyBroker" in code:
        pytest.skip("a template for adapter authors, not a program")
    # the examples read the environment (from_env): run them the same on every machine
    env = {k: v for k, v in os.environ.items() if k not in BROKER_VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    if "agents.writer" in code:
        assert result.stdout.splitlines()[:2] == ["streams of tokens ", "3 votes"]
        assert re.search(r"^approve with (9|10)s to spare$", result.stdout, re.M)
        assert "remote: RuntimeError model endpoint down" in result.stdout
    if index == 0:
        assert "reply {'sum': 6}" in result.stdout
        assert "task {'action': 'analyze'} correlation c-1" in result.stdout


async def test_demo_shows_every_pattern() -> None:
    lines: list[str] = []
    outcome = await run_demo("memory://", say=lines.append)
    assert outcome["task_result"] == ("task-42", {"words": 4})
    assert outcome["request_reply"] == {"sum": 6}
    assert outcome["stream"] == ["a", "short", "note", "on", "message", "buses"]
    assert outcome["votes"] == {"approve": 2, "revise": 1}
    assert outcome["wildcards"] == {
        "events.user.*": ["events.user.created", "events.user.deleted"],
        "events.>": ["events.order.paid", "events.user.created", "events.user.deleted"],
    }
    work = outcome["work_queue"]
    assert isinstance(work, dict) and sum(work.values()) == 9 and len(work) == 3
    dead = outcome["dead_letter"]
    assert isinstance(dead, dict)
    assert dead["amb-attempts"] == "3" and dead["amb-error-type"] == "RuntimeError"
    assert outcome["replay"] == ["events.user.created", "events.user.deleted",
                                 "events.order.paid"]
    assert any("dead letter" in line for line in lines)


def test_amb_demo_command_runs() -> None:
    result = subprocess.run([*amb_command(), "demo"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "request -> response" in result.stdout and "done." in result.stdout


def test_amb_command_is_the_interpreters_own(tmp_path: Path) -> None:
    """The helper names an absolute file next to the interpreter or the interpreter itself:
    it never leaves `amb` to a PATH lookup (a fresh CI venv has no `amb` on PATH)."""
    command = amb_command()
    assert Path(command[0]).is_absolute() and Path(command[0]).parent == Path(
        sys.executable).parent
    bare = tmp_path / "bin"
    bare.mkdir()
    python = bare / "python"
    assert amb_command(str(python)) == [str(python), "-m", "amb_core"]
    (bare / "amb").write_text("#!/bin/sh\n")
    assert amb_command(str(python)) == [str(bare / "amb")]


def test_python_dash_m_amb_core_works_without_amb_on_path() -> None:
    env = {**os.environ, "PATH": os.devnull}  # nothing on PATH at all: no `amb` to find
    for command in (amb_command(), [sys.executable, "-m", "amb_core"]):
        result = subprocess.run([*command, "--help"], capture_output=True, text=True,
                                timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert "usage: amb" in result.stdout and "publish" in result.stdout


@pytest.mark.parametrize("command", [[], ["demo"], ["publish"], ["subscribe"], ["request"],
                                     ["serve"], ["groups"], ["groups", "delete"], ["bench"]])
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: amb" in capsys.readouterr().out


def test_bench_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--messages", "2000", "--requests", "100", "--concurrency", "10",
                 "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "ceiling" in out and "throughput" in out and "10 in flight" in out


def test_cli_publish_and_request_errors_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "bad..topic", "1", "--url", "memory://"]) == 1
    assert "ValueError" in capsys.readouterr().err
    # on memory:// nobody can answer: it fails at once (tests/test_cli_serve.py has the rest,
    # and the RequestTimeout on a real broker)
    assert main(["request", "nobody", "1", "--timeout", "0.1", "--url", "memory://"]) == 2
    assert "cannot be answered" in capsys.readouterr().err


def _clear_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BROKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_cli_url_default_comes_from_the_environment_like_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear_broker_env(monkeypatch)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert main(["publish", "t", "1"]) == 1
    assert "cannot connect to Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err
    monkeypatch.setenv("AMB_URL", "")  # blank counts as unset, it is not a URL
    assert main(["publish", "t", "1"]) == 1
    assert "cannot connect to Redis" in capsys.readouterr().err


def test_cli_ambiguous_environment_is_an_error_but_help_still_works(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear_broker_env(monkeypatch)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    assert main(["publish", "t", "1"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: ambiguous broker configuration: NATS_URL, REDIS_URL" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["publish", "--help"])
    assert exit_info.value.code == 0
    assert "AMB_URL" in capsys.readouterr().out

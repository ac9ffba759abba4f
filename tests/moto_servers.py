"""A moto server (SQS, SNS, S3) on a free loopback port, for the SQS adapter's tests.

``moto_server`` runs as a subprocess (not ``ThreadedMotoServer``: in-process it would share the
test's GIL and its event loop's CPU). Locally, tests skip when moto is not installed; when CI
requires ``sqs`` (AMB_REQUIRE_BROKERS) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.servers import free_port

HOST = "127.0.0.1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Dummy credentials for moto: the tests never see real ones."""


def _required() -> bool:
    names = {b.strip() for b in os.environ.get("AMB_REQUIRE_BROKERS", "").split(",")}
    return "sqs" in names


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason}, and AMB_REQUIRE_BROKERS requires sqs", pytrace=False)
    pytest.skip(reason)


def _command() -> list[str] | None:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script)]
    found = shutil.which("moto_server")
    return [found] if found else None


class MotoServer:
    """One ``moto_server`` process; :meth:`restart` kills it and starts a fresh one (empty
    state) on the same port, as a restarted LocalStack without persistence would be."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        try:
            import aiobotocore  # noqa: F401
            import moto  # noqa: F401
        except ImportError as exc:
            return f"moto or aiobotocore not installed ({exc.name})"
        if _command() is None:
            return "moto_server is not on PATH (pip install 'moto[server]')"
        return None

    def start(self, timeout: float = 20.0) -> None:
        command = _command()
        assert command is not None
        self._process = subprocess.Popen(
            [*command, "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    async def restart(self) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(self.start)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    reason = MotoServer.available()
    if reason is not None:
        _unavailable(reason)
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    server = MotoServer()
    try:
        server.start()
    except RuntimeError as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def private_moto() -> AsyncIterator[MotoServer]:
    """A moto server of the test's own, to restart."""
    reason = MotoServer.available()
    if reason is not None:
        _unavailable(reason)
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()

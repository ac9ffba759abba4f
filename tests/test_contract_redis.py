"""The contract suite on Redis: the shared server on 6379, and a private one for the restart."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tests.conftest import port_open, require_server

from amb_core.adapters import RedisBroker
from amb_core.testing import BrokerContract

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own on a free port, with an append-only file fsynced on every
    write (so a restart loses nothing), in a temporary directory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="amb-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(  # noqa: ASYNC220 - starts at once, never waits
            [binary, "--bind", HOST, "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.1):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis-server fsyncs the AOF and exits
            await asyncio.to_thread(self.process.wait, 10)
        self.process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        await server.start()
        yield server
    finally:
        server.cleanup()


class TestRedisContract(BrokerContract):
    wait = 10.0
    redelivery_wait = 10.0

    @pytest.fixture(autouse=True)
    async def _drop_streams(self, topic: str) -> AsyncIterator[None]:
        """The suite's topics are unique per test: delete the streams a test made."""
        yield
        if not port_open(HOST, PORT):
            return
        import redis.asyncio as redis

        client = redis.Redis.from_url(URL)
        try:
            async for key in client.scan_iter(match=f"{topic}*", count=1000):
                await client.delete(key)
        finally:
            await client.aclose()

    @pytest.fixture
    def broker_factory(self) -> Callable[[], RedisBroker]:
        require_server("redis", HOST, PORT)
        # claim_idle short so the crash case does not wait 30 s; replay on the suite's topics.
        return lambda: RedisBroker(URL, claim_idle=1.0, stream_topics=["ct.>"])

    @pytest.fixture
    def raw_publish(self) -> Callable[[str, bytes, dict[str, str]], Awaitable[None]]:
        import redis.asyncio as redis

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            client = redis.Redis.from_url(URL)
            try:
                await client.publish(topic, body)  # Redis pub/sub has no headers
            finally:
                await client.aclose()

        return publish

    @pytest.fixture
    def restartable(
        self, private_redis: PrivateRedis
    ) -> tuple[Callable[[], RedisBroker], Callable[[], Awaitable[None]]]:
        return (lambda: RedisBroker(private_redis.url, claim_idle=1.0), private_redis.restart)

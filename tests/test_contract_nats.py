"""The contract suite on NATSBroker, core NATS and JetStream, against the real server.

The shared server (127.0.0.1:4222, JetStream enabled) serves every case but reconnect, which
restarts a private nats-server (its own port and -sd directory) mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from tests.conftest import require_server

from amb_core.adapters.nats import NATSBroker, flush_in_order
from amb_core.testing import BrokerContract

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"
# Short enough that a crashed member's message comes back within the suite's waits.
TEST_ACK_WAIT = 3.0
TEST_STREAM_MAX_AGE = 3600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class PrivateNATS:
    """A nats-server of our own (JetStream on, its own store dir), to restart at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="amb-nats-")
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.skip("nats-server binary not found")
        self.process = subprocess.Popen(
            [binary, "-a", HOST, "-p", str(self.port), "-js", "-sd", self.store,
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("private nats-server did not start within 10s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def restart(self) -> None:
        await asyncio.to_thread(self.stop)
        await asyncio.to_thread(self.start)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture
def private_nats() -> Iterator[PrivateNATS]:
    server = PrivateNATS()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def make_broker(url: str, jetstream: bool, **options: object) -> NATSBroker:
    if jetstream:
        options.setdefault("ack_wait", TEST_ACK_WAIT)
        options.setdefault("stream_max_age", TEST_STREAM_MAX_AGE)
    return NATSBroker(servers=[url], use_jetstream=jetstream, **options)  # type: ignore[arg-type]


class _NATSContract(BrokerContract):
    jetstream = False
    fast_path = True
    wait = 10.0
    redelivery_wait = 15.0

    @pytest.fixture
    def broker_factory(self) -> Callable[[], NATSBroker]:
        require_server("nats", HOST, PORT)
        return lambda: make_broker(URL, self.jetstream, fast_path=self.fast_path)

    @pytest.fixture
    async def raw_publish(self) -> AsyncIterator[Callable[[str, bytes, dict[str, str]],
                                                           Awaitable[None]]]:
        import nats

        require_server("nats", HOST, PORT)
        nc = await nats.connect(URL)

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            await nc.publish(topic, body, headers=headers or None)
            # At the server before the bus publishes (nc.flush() alone can overtake the PUB).
            await flush_in_order(nc)

        yield publish
        await nc.close()

    @pytest.fixture
    def restartable(
        self, private_nats: PrivateNATS
    ) -> tuple[Callable[[], NATSBroker], Callable[[], Awaitable[None]]]:
        return (
            lambda: make_broker(private_nats.url, self.jetstream, reconnect_time_wait=0.2,
                                fast_path=self.fast_path),
            private_nats.restart,
        )


class TestNATSCoreContract(_NATSContract):
    """Core NATS: at-most-once, no persistence, no replay (the suite skips those cases)."""

    jetstream = False


class TestNATSJetStreamContract(_NATSContract):
    """JetStream: persistent groups (durable pull consumers), redelivery, replay."""

    jetstream = True


class TestNATSCoreContractPublicAPI(_NATSContract):
    """Core mode through nats-py's public API only (``fast_path=False``: what the adapter
    falls back to when a nats-py version lacks the internals the fast path uses)."""

    jetstream = False
    fast_path = False


class TestNATSJetStreamContractPublicAPI(_NATSContract):
    """JetStream mode through nats-py's public API only (``fast_path=False``)."""

    jetstream = True
    fast_path = False

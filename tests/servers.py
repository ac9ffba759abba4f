"""Private broker servers for tests that restart or break one: written once, used by every
test module (through the ``private_redis``, ``private_nats`` and ``private_rabbit`` fixtures
in conftest.py). Each runs on free ports of its own, in a temporary directory; the machine's
shared instances are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from tests.conftest import port_open

HOST = "127.0.0.1"
RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"


def free_port() -> int:
    """A TCP port nothing listens on right now (on the loopback interface)."""
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


class PrivateRabbit:
    """A RabbitMQ node of our own (own node name, ports, data and log dirs, no plugins).

    Needs root (it runs the node as the ``rabbitmq`` user, whose Erlang cookie rabbitmqctl uses).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"amb{os.getpid()}x{self.port}@localhost"
        self.url = f"amqp://guest:guest@{HOST}:{self.port}/"
        self.dir = tempfile.mkdtemp(prefix="amb-rabbit-")
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as conf:
            conf.write(f"listeners.tcp.1 = {HOST}:{self.port}\nloopback_users.guest = true\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for name in os.listdir(self.dir):
            shutil.chown(os.path.join(self.dir, name), "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "HOME": "/var/lib/rabbitmq",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_PID_FILE": os.path.join(self.dir, "pid"),
        }

    @staticmethod
    def available() -> str | None:
        """Why a private node cannot run here, or None."""
        if not os.path.exists(f"{RABBITMQ_BIN}/rabbitmq-server"):
            return "rabbitmq-server is not installed"
        if os.geteuid() != 0:
            return "a private RabbitMQ node needs root (to run as the rabbitmq user)"
        if shutil.which("runuser") is None:
            return "runuser is missing"
        return None

    def _run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "rabbitmq", "--", *args], env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )

    def start(self, timeout: float = 60.0) -> None:
        result = self._run(f"{RABBITMQ_BIN}/rabbitmq-server", "-detached")
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmq-server failed: {result.stderr or result.stdout}")
        deadline = time.monotonic() + timeout
        while True:  # await_startup fails fast until the node answers: retry it
            ready = self._run(f"{RABBITMQ_BIN}/rabbitmqctl", "-n", self.node, "await_startup",
                              "-t", "5")
            if ready.returncode == 0 and port_open(HOST, self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ node did not start: {ready.stderr}")
            time.sleep(0.3)

    def stop(self) -> None:
        self._run(f"{RABBITMQ_BIN}/rabbitmqctl", "-n", self.node, "stop", timeout=60)

    async def restart(self) -> None:
        await asyncio.to_thread(self.stop)
        await asyncio.to_thread(self.start)

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

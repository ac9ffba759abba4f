"""The contract suite on RabbitMQ (the shared node on 127.0.0.1:5672; a private node for restarts).

Group queues made here expire 60 s after their last consumer leaves (``queue_expires``), so the
shared broker does not collect quorum queues run after run.
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
from collections.abc import Iterator

import pytest

from amb_core.adapters import RabbitMQBroker
from amb_core.testing import BrokerContract
from conftest import port_open, require_server

HOST = "127.0.0.1"
PORT = 5672
URL = os.environ.get("RABBITMQ_URL", f"amqp://guest:guest@{HOST}:{PORT}/")
EXCHANGE = "amb.test"
QUEUE_EXPIRES = 60.0
RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"


def test_broker(url: str = URL, **options: object) -> RabbitMQBroker:
    options.setdefault("exchange", EXCHANGE)
    options.setdefault("queue_expires", QUEUE_EXPIRES)
    return RabbitMQBroker(url=url, **options)  # type: ignore[arg-type]


test_broker.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PrivateRabbit:
    """A RabbitMQ node of our own (own node name, ports, data and log dirs, no plugins).

    Needs root (it runs the node as the ``rabbitmq`` user, whose Erlang cookie rabbitmqctl uses).
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.dist_port = _free_port()
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


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    require_server("rabbitmq", HOST, PORT)
    reason = PrivateRabbit.available()
    if reason is not None:
        pytest.skip(reason)
    node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.remove()


class TestRabbitMQContract(BrokerContract):
    wait = 10.0

    @pytest.fixture
    def broker_factory(self):
        require_server("rabbitmq", HOST, PORT)
        return test_broker

    @pytest.fixture
    def raw_publish(self):
        import aiormq
        from pamqp import commands as spec

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            connection = await aiormq.connect(URL)
            try:
                channel = await connection.channel()
                await channel.basic_publish(
                    body, exchange=EXCHANGE, routing_key=topic,
                    properties=spec.Basic.Properties(headers=dict(headers) or None),
                )
            finally:
                await connection.close()

        return publish

    @pytest.fixture
    def restartable(self, private_rabbit: PrivateRabbit):
        return (lambda: test_broker(private_rabbit.url)), private_rabbit.restart

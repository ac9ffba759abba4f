"""Broker clusters on loopback for the cluster tests (and the benchmarks' cluster runs): a
3-server NATS cluster with JetStream clustered, and a RabbitMQ cluster of private nodes. Each
runs on free ports of its own, in temporary directories, and is removed afterwards; the
machine's shared instances are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
from tests.conftest import required_brokers
from tests.servers import HOST, RABBITMQ_BIN, PrivateRabbit, free_port


def unavailable(requirement: str, reason: str) -> None:
    """Skip (locally) or fail (when ``AMB_REQUIRE_BROKERS`` names ``requirement``)."""
    if requirement in required_brokers():
        pytest.fail(f"{reason}, and AMB_REQUIRE_BROKERS requires {requirement}", pytrace=False)
    pytest.skip(reason)


# --- NATS ------------------------------------------------------------------------------------


class NATSServer:
    """One server of a :class:`NATSCluster` (its own ports, config and store dir)."""

    def __init__(self, name: str, root: str) -> None:
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port()
        self.monitor_port = free_port()
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "nats.conf")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def route(self) -> str:
        return f"nats-route://{HOST}:{self.cluster_port}"

    def write_config(self, cluster: str, routes: list[str]) -> None:
        route_list = ", ".join(f'"{r}"' for r in routes)
        with open(self.config, "w") as conf:
            conf.write(
                f'server_name: "{self.name}"\n'
                f'listen: "{HOST}:{self.port}"\n'
                f'http: "{HOST}:{self.monitor_port}"\n'
                f'jetstream {{ store_dir: "{self.dir}/js" }}\n'
                f'cluster {{ name: "{cluster}", listen: "{HOST}:{self.cluster_port}", '
                f"routes: [{route_list}] }}\n"
            )

    def start(self, binary: str) -> None:
        log = open(os.path.join(self.dir, "server.log"), "ab")  # noqa: SIM115 - child keeps it
        try:
            self.process = subprocess.Popen([binary, "-c", self.config], stdout=log,
                                            stderr=log)
        finally:
            log.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as a crashed machine would."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def healthy(self) -> bool:
        """JetStream on this server is up, in contact with a meta leader, and current on
        every stream and consumer it holds (nats-server's ``/healthz``)."""
        import urllib.request

        url = f"http://{HOST}:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


class NATSCluster:
    """``size`` nats-servers routed to each other, JetStream clustered (one cluster name)."""

    def __init__(self, size: int = 3, name: str = "amb") -> None:
        self.root = tempfile.mkdtemp(prefix="amb-natscluster-")
        self.name = name
        self.servers = [NATSServer(f"n{i + 1}", self.root) for i in range(size)]
        routes = [s.route for s in self.servers]
        for server in self.servers:
            server.write_config(name, routes)

    @staticmethod
    def available() -> str | None:
        return None if shutil.which("nats-server") else "nats-server is not installed"

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """One URL naming every server: ``nats://h:p1,h:p2,h:p3``."""
        return "nats://" + ",".join(f"{HOST}:{s.port}" for s in self.servers)

    def server(self, name: str) -> NATSServer:
        return next(s for s in self.servers if s.name == name)

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("nats-server")
        assert binary is not None
        for server in self.servers:
            if not server.running():
                server.start(binary)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            waiting = [s.name for s in self.servers if s.running() and not s.healthy()]
            dead = [s.name for s in self.servers if s.process is not None and not s.running()
                    and s.process.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM)]
            if dead:
                raise RuntimeError(f"nats-server {dead} exited; see {self.root}")
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"NATS cluster not healthy within {timeout}s: {waiting}")
            time.sleep(0.1)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        server = self.server(name)
        server.kill()
        binary = shutil.which("nats-server")
        assert binary is not None
        server.start(binary)
        self.wait_healthy(timeout)

    def remove(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- RabbitMQ --------------------------------------------------------------------------------


class RabbitNode(PrivateRabbit):
    """A private RabbitMQ node that can join a cluster: its cookie is the ``rabbitmq`` user's
    (the same file every node started here reads), its node name is ``<name>@localhost``."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = False

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self._run(f"{RABBITMQ_BIN}/rabbitmqctl", "-n", self.node, *args, timeout=timeout)

    def launch(self) -> None:
        """``rabbitmq-server -detached``: returns at once, the node boots in the background."""
        result = self._run(f"{RABBITMQ_BIN}/rabbitmq-server", "-detached")
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmq-server failed: {result.stderr or result.stdout}")
        self.alive = True

    def await_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # await_startup fails fast until the node answers: retry it
            ready = self.ctl("await_startup", "-t", "5", timeout=30)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not start: {ready.stderr}")
            time.sleep(0.3)

    def start(self, timeout: float = 120.0) -> None:
        self.launch()
        self.await_ready(timeout)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash, not a clean stop)."""
        pid_file = os.path.join(self.dir, "pid")
        with contextlib.suppress(OSError, ValueError):
            with open(pid_file) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self.alive = False

    def join(self, seed: RabbitNode) -> None:
        for args in (("stop_app",), ("join_cluster", seed.node), ("start_app",)):
            result = self.ctl(*args, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node} failed: "
                                   f"{result.stderr or result.stdout}")

    def remove(self) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=60)
        self.kill()
        keep = os.environ.get("AMB_KEEP_CLUSTER_LOGS")
        if keep:
            shutil.copytree(os.path.join(self.dir, "log"), os.path.join(keep, self.node),
                            dirs_exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """``size`` private RabbitMQ nodes joined into one cluster (``rabbitmqctl join_cluster``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.nodes: list[RabbitNode] = []

    @staticmethod
    def available() -> str | None:
        return PrivateRabbit.available()

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(self.size):
            node = RabbitNode()
            self.nodes.append(node)
            node.launch()  # boot them side by side, then wait for each
        for node in self.nodes:
            node.await_ready(max(deadline - time.monotonic(), 10))
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.join(seed)
        result = seed.ctl("await_online_nodes", str(self.size), "-t",
                          str(int(max(deadline - time.monotonic(), 10))))
        if result.returncode != 0:
            raise RuntimeError(f"RabbitMQ cluster did not form: {result.stderr}")

    def node_of_port(self, port: int) -> RabbitNode:
        return next(n for n in self.nodes if n.port == port)

    def node_named(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == name)

    def queue(self, name: str) -> dict[str, object]:
        """``type``, ``leader``, ``members`` (node names) of queue ``name``, as a live node
        of the cluster sees it."""
        import json

        for node in self.nodes:
            if not node.alive:
                continue
            result = node.ctl("list_queues", "name", "type", "leader", "members",
                              "--formatter", "json", "-q", timeout=30)
            if result.returncode != 0:
                continue
            for row in json.loads(result.stdout or "[]"):
                if row.get("name") == name:
                    return dict(row)
            return {}
        raise RuntimeError("no live RabbitMQ node answered list_queues")

    def restart(self, node: RabbitNode, timeout: float = 120.0) -> None:
        """Kill ``node`` and start it again; it rejoins the cluster from its own data."""
        node.kill()
        node.start(timeout)

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True

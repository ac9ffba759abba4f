"""A Redis Cluster of our own on loopback for the cluster tests: N redis-server processes on
free ports P (with P + 10,000 free too, the cluster bus; P < 55,536), joined with
``redis-cli --cluster create``, each in a temporary directory that goes away on teardown.
The machine's shared Redis on 6379 is never touched.
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

HOST = "127.0.0.1"
BUS_OFFSET = 10_000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports P, each free with P + 10,000 free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port >= 65_536 - BUS_OFFSET:
            port = 20_000 + port % 30_000
        if port not in ports and _free(port) and _free(port + BUS_OFFSET):
            ports.append(port)
    return ports


def require_binaries() -> tuple[str, str]:
    """redis-server and redis-cli, or skip (locally) / fail (AMB_REQUIRE_BROKERS has
    ``redis-cluster``)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "redis-server and redis-cli are needed to run a Redis Cluster on loopback"
        if "redis-cluster" in required_brokers():
            pytest.fail(f"{message}, and AMB_REQUIRE_BROKERS requires redis-cluster",
                        pytrace=False)
        pytest.skip(message)
    return server, cli


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each. Nodes' append-only files are
    fsynced every second (Redis's default; a SIGTERM flushes it, so :meth:`restart` loses
    nothing); what a failover can lose is the replication lag, which is the point of the
    failover test."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.server, self.cli = require_binaries()
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(masters * (1 + replicas))
        self.dir = tempfile.mkdtemp(prefix="amb-rcluster-")
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The URL of the first node (any node's works)."""
        return f"redis://{HOST}:{self.ports[0]}/0"

    def url_of(self, port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    def _start_node(self, port: int) -> None:
        node_dir = os.path.join(self.dir, str(port))
        os.makedirs(node_dir, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.server, "--bind", HOST, "--port", str(port), "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", node_dir,
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def _wait_port(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {port} did not start")

    def cli_call(self, port: int, *args: str, timeout: float = 10.0) -> str:
        return subprocess.run(
            [self.cli, "-h", HOST, "-p", str(port), *args], check=True, capture_output=True,
            timeout=timeout, text=True,
        ).stdout

    def start(self) -> RedisCluster:
        try:
            for port in self.ports:
                self._start_node(port)
            for port in self.ports:
                self._wait_port(port)
            subprocess.run(
                [self.cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            self.wait_ok()
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0, ports: list[int] | None = None) -> None:
        """Until every live node says ``cluster_state:ok`` and knows every slot's master."""
        deadline = time.monotonic() + timeout
        live = ports or [p for p in self.ports if self.alive(p)]
        while True:
            try:
                if all("cluster_state:ok" in self.cli_call(p, "CLUSTER", "INFO") for p in live) \
                        and all(self._replicas_synced(p) for p in live):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def _replicas_synced(self, port: int) -> bool:
        info = self.cli_call(port, "INFO", "replication")
        if "role:slave" in info:
            return "master_link_status:up" in info
        return True

    def restart(self) -> None:
        """Stop every node (SIGTERM: each writes its append-only file), start them again on
        the same ports and directories; returns once the cluster is ok again."""
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(30)
        self.processes.clear()
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait_port(port)
        self.wait_ok()

    def revive(self, port: int) -> None:
        """Start a killed node again on its port and directory: it rejoins the cluster (as a
        replica of whoever took over its slots)."""
        self._start_node(port)
        self._wait_port(port)

    def alive(self, port: int) -> bool:
        process = self.processes.get(port)
        return process is not None and process.poll() is None

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = int(self.cli_call(self.ports[0], "CLUSTER", "KEYSLOT", key).strip())
        for port in self.ports:
            if not self.alive(port):
                continue
            for line in self.cli_call(port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for spec in fields[8:]:
                    low, _, high = spec.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
            break
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on ``master``."""
        lines = [line.split() for line in self.cli_call(master, "CLUSTER", "NODES").splitlines()]
        master_id = next(f[0] for f in lines if "myself" in f[2])
        for fields in lines:
            if "slave" in fields[2] and fields[3] == master_id:
                return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"the master on {master} has no replica")

    def freeze(self, port: int) -> None:
        """SIGSTOP a node: it stops reading its replication stream (replication lag)."""
        self.processes[port].send_signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGCONT)

    def kill(self, port: int) -> None:
        """SIGKILL a node: no goodbye, the others notice after node-timeout."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

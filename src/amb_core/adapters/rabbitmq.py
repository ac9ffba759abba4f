"""RabbitMQBroker (aio-pika): implementation pending (issue: RabbitMQ adapter)."""

from __future__ import annotations

from amb_core.adapters._client import PlaceholderBroker
from amb_core.broker import mask_url


class RabbitMQBroker(PlaceholderBroker):
    client_module = "aio_pika"
    extra = "rabbitmq"

    def __init__(self, url: str = "amqp://guest:guest@localhost:5672/") -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"RabbitMQBroker(url={mask_url(self.url)!r})"

    @classmethod
    def from_url(cls, url: str) -> RabbitMQBroker:
        return cls(url=url)

"""KafkaBroker (aiokafka): named in the API, implementation pending (see the README)."""

from __future__ import annotations

from amb_core.adapters._client import PlaceholderBroker


class KafkaBroker(PlaceholderBroker):
    client_module = "aiokafka"
    extra = "kafka"

    def __init__(self, bootstrap_servers: str | list[str] = "localhost:9092", **options: object):
        self.bootstrap_servers = bootstrap_servers
        self.options = options

    def __repr__(self) -> str:
        return f"KafkaBroker(bootstrap_servers={self.bootstrap_servers!r})"

    @classmethod
    def from_url(cls, url: str) -> KafkaBroker:
        return cls(bootstrap_servers=url.split("://", 1)[1].rstrip("/"))

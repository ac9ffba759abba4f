"""NATSBroker (nats-py): implementation pending (issue: NATS adapter)."""

from __future__ import annotations

from amb_core.adapters._client import PlaceholderBroker
from amb_core.broker import mask_url


class NATSBroker(PlaceholderBroker):
    client_module = "nats"
    extra = "nats"

    def __init__(self, servers: list[str] | str = "nats://localhost:4222",
                 use_jetstream: bool = False) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.use_jetstream = use_jetstream

    def __repr__(self) -> str:
        servers = [mask_url(s) for s in self.servers]
        return f"NATSBroker(servers={servers!r}, use_jetstream={self.use_jetstream})"

    @classmethod
    def from_url(cls, url: str) -> NATSBroker:
        return cls(servers=[url])

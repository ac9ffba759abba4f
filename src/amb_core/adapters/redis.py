"""RedisBroker (redis-py asyncio): implementation pending (issue: Redis adapter)."""

from __future__ import annotations

from amb_core.adapters._client import PlaceholderBroker
from amb_core.broker import mask_url


class RedisBroker(PlaceholderBroker):
    client_module = "redis"
    extra = "redis"
    default_dead_letter_topic = "dlq:agent-messages"

    def __init__(self, url: str = "redis://localhost:6379/0",
                 dead_letter_queue: str = "dlq:agent-messages") -> None:
        self.url = url
        self.dead_letter_queue = dead_letter_queue
        self.default_dead_letter_topic = dead_letter_queue

    def __repr__(self) -> str:
        return f"RedisBroker(url={mask_url(self.url)!r})"

    @classmethod
    def from_url(cls, url: str) -> RedisBroker:
        return cls(url=url)

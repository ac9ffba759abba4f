"""The contract suite on Redis: the shared server on 6379, and a private one for the restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tests.conftest import port_open, require_server
from tests.servers import PrivateRedis

from amb_core.adapters import RedisBroker
from amb_core.testing import BrokerContract

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


class TestRedisContract(BrokerContract):
    wait = 10.0
    redelivery_wait = 10.0

    @pytest.fixture(autouse=True)
    async def _drop_streams(self, topic: str) -> AsyncIterator[None]:
        """The suite's topics are unique per test: delete the streams a test made."""
        yield
        if not port_open(HOST, PORT):
            return
        import redis.asyncio as redis

        client = redis.Redis.from_url(URL)
        try:
            async for key in client.scan_iter(match=f"{topic}*", count=1000):
                await client.delete(key)
        finally:
            await client.aclose()

    @pytest.fixture
    def broker_factory(self) -> Callable[[], RedisBroker]:
        require_server("redis", HOST, PORT)
        # claim_idle short so the crash case does not wait 30 s; replay on the suite's topics.
        return lambda: RedisBroker(URL, claim_idle=1.0, stream_topics=["ct.>"])

    @pytest.fixture
    def raw_publish(self) -> Callable[[str, bytes, dict[str, str]], Awaitable[None]]:
        import redis.asyncio as redis

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            client = redis.Redis.from_url(URL)
            try:
                await client.publish(topic, body)  # Redis pub/sub has no headers
            finally:
                await client.aclose()

        return publish

    @pytest.fixture
    def restartable(
        self, private_redis: PrivateRedis
    ) -> tuple[Callable[[], RedisBroker], Callable[[], Awaitable[None]]]:
        return (lambda: RedisBroker(private_redis.url, claim_idle=1.0), private_redis.restart)


class TestRedisContractPublicReplies(TestRedisContract):
    """The whole suite again with the fast path off: replies read by redis-py's public
    read_response() (what an untested redis-py version gets)."""

    @pytest.fixture
    def broker_factory(self) -> Callable[[], RedisBroker]:
        require_server("redis", HOST, PORT)
        return lambda: RedisBroker(URL, claim_idle=1.0, stream_topics=["ct.>"], fast_path=False)

    @pytest.fixture
    def restartable(
        self, private_redis: PrivateRedis
    ) -> tuple[Callable[[], RedisBroker], Callable[[], Awaitable[None]]]:
        return (lambda: RedisBroker(private_redis.url, claim_idle=1.0, fast_path=False),
                private_redis.restart)

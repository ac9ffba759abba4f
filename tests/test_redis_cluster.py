"""The contract suite on a Redis Cluster of three masters started on loopback for this module
(tests/redis_cluster.py), with the broker given one node's URL and finding the cluster itself;
a restart of the whole cluster for the reconnect case; and the cluster-specific cases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from tests.redis_cluster import RedisCluster

from amb_core.adapters import RedisBroker
from amb_core.testing import BrokerContract


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    node = RedisCluster(masters=3).start()
    try:
        yield node
    finally:
        node.cleanup()


@pytest.fixture
def restart_cluster() -> Iterator[RedisCluster]:
    node = RedisCluster(masters=3).start()
    try:
        yield node
    finally:
        node.cleanup()


async def delete_keys(url: str, match: str) -> None:
    from redis.asyncio.cluster import RedisCluster as Client

    client = Client.from_url(url)
    try:
        async for key in client.scan_iter(match=match, count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


class TestRedisClusterContract(BrokerContract):
    wait = 10.0
    redelivery_wait = 10.0

    @pytest.fixture(autouse=True)
    async def _drop_streams(self, cluster: RedisCluster, topic: str) -> AsyncIterator[None]:
        yield
        await delete_keys(cluster.url, f"{topic}*")

    @pytest.fixture
    def broker_factory(self, cluster: RedisCluster) -> Callable[[], RedisBroker]:
        # Each broker gets another node's URL: any node's works.
        urls = iter([cluster.url_of(p) for p in cluster.ports] * 1000)
        return lambda: RedisBroker(next(urls), claim_idle=1.0, stream_topics=["ct.>"])

    @pytest.fixture
    def raw_publish(self, cluster: RedisCluster
                    ) -> Callable[[str, bytes, dict[str, str]], Awaitable[None]]:
        import redis.asyncio as redis

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            client = redis.Redis.from_url(cluster.url)
            try:
                await client.publish(topic, body)  # broadcast to every node of the cluster
            finally:
                await client.aclose()

        return publish

    @pytest.fixture
    def restartable(
        self, restart_cluster: RedisCluster
    ) -> tuple[Callable[[], RedisBroker], Callable[[], Awaitable[None]]]:
        async def restart() -> None:
            await asyncio.to_thread(restart_cluster.restart)

        return (lambda: RedisBroker(restart_cluster.url, claim_idle=1.0), restart)

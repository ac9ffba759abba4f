"""The contract suite on a Redis Cluster of three masters started on loopback for this module
(tests/redis_cluster.py), with the broker given one node's URL and finding the cluster itself;
a restart of the whole cluster for the reconnect case; and the cluster-specific cases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from tests.redis_cluster import RedisCluster
from tests.servers import PrivateRedis

from amb_core.adapters import RedisBroker
from amb_core.broker import Delivery
from amb_core.errors import BrokerConnectionError
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


class TestRedisClusterContractPublicReplies(TestRedisClusterContract):
    """The suite again on the cluster with the fast path off (the per-node writer reading
    replies with redis-py's public read_response())."""

    @pytest.fixture
    def broker_factory(self, cluster: RedisCluster) -> Callable[[], RedisBroker]:
        urls = iter([cluster.url_of(p) for p in cluster.ports] * 1000)
        return lambda: RedisBroker(next(urls), claim_idle=1.0, stream_topics=["ct.>"],
                                   fast_path=False)


# --- cluster-specific cases ----------------------------------------------------------------


async def test_cluster_mode_is_detected_from_any_node(cluster: RedisCluster) -> None:
    for port in cluster.ports:
        broker = RedisBroker(cluster.url_of(port))
        await broker.connect()
        try:
            assert broker.clustered
        finally:
            await broker.close()


async def test_cluster_true_on_a_single_node_fails_and_false_keeps_single_node(
    private_redis: PrivateRedis,
) -> None:
    broker = RedisBroker(private_redis.url, cluster=True, connect_timeout=2.0)
    with pytest.raises(BrokerConnectionError, match="cannot connect to Redis"):
        await broker.connect()
    assert broker.writer is None
    single = RedisBroker(private_redis.url)
    await single.connect()
    try:
        assert not single.clustered and single.topology is None
        assert type(single.writer).__name__ == "Writer"  # the single-node writer, unchanged
    finally:
        await single.close()


async def test_cluster_false_on_a_cluster_is_refused_by_moved(cluster: RedisCluster) -> None:
    """Without cluster mode every key not on the URL's node is MOVED (what the issue saw)."""
    from redis.exceptions import MovedError

    broker = RedisBroker(cluster.url, cluster=False, stream_topics=["rc.>"])
    await broker.connect()
    try:
        assert not broker.clustered
        with pytest.raises(MovedError):
            for i in range(30):  # some of these keys live on another node
                await broker.publish(f"rc.moved.{i}", b"x", {})
    finally:
        await broker.close()


def _topics_on_every_master(cluster: RedisCluster, prefix: str) -> list[str]:
    """One topic per master (by the master serving its stream key)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < cluster.masters:
        topic = f"{prefix}.{i}"
        found.setdefault(cluster.master_of(topic), topic)
        i += 1
    return list(found.values())


async def test_publishes_land_on_each_keys_node_and_wildcards_see_all(
    cluster: RedisCluster,
) -> None:
    """One broker pipelines to all three masters at once; each stream is on its slot's
    master; a wildcard subscriber connected to one node sees topics of every node."""
    from redis.asyncio import Redis

    topics = _topics_on_every_master(cluster, "rc.spread")
    publisher = RedisBroker(cluster.url, stream_topics=["rc.>"])
    listener = RedisBroker(cluster.url_of(cluster.ports[1]))
    await publisher.connect()
    await listener.connect()
    got: list[str] = []
    done = asyncio.Event()

    async def on(delivery: Delivery) -> None:
        got.append(delivery.topic)
        if len(got) == 3 * 20:
            done.set()

    try:
        sub = await listener.subscribe("rc.spread.*", on)
        await asyncio.gather(*(publisher.publish(t, b"%d" % n, {})
                               for n in range(20) for t in topics))
        await asyncio.wait_for(done.wait(), 10)
        assert sorted(set(got)) == sorted(topics)
        assert publisher.writer is not None
        assert len(publisher.writer.conns) == 3  # type: ignore[attr-defined]
        for topic in topics:
            node = Redis(host="127.0.0.1", port=cluster.master_of(topic))
            try:
                assert await node.xlen(topic) == 20
            finally:
                await node.aclose()
        await sub.close()
    finally:
        await publisher.close()
        await listener.close()
        await delete_keys(cluster.url, "rc.spread.*")


async def test_groups_on_every_node_share_one_writer_for_acks(cluster: RedisCluster) -> None:
    """Group members on streams of all three masters, acks pipelined per node: nothing is
    left pending."""
    from redis.asyncio.cluster import RedisCluster as Client

    topics = _topics_on_every_master(cluster, "rc.groups")
    broker = RedisBroker(cluster.url)
    await broker.connect()
    got: dict[str, int] = dict.fromkeys(topics, 0)
    done = asyncio.Event()

    async def on(delivery: Delivery) -> None:
        got[delivery.topic] += 1
        await delivery.ack()
        if sum(got.values()) == 3 * 50:
            done.set()

    client = Client.from_url(cluster.url)
    try:
        for topic in topics:
            await broker.subscribe(topic, on, group="g")
        for n in range(50):
            for topic in topics:
                await broker.publish(topic, b"%d" % n, {})
        await asyncio.wait_for(done.wait(), 10)
        assert broker.writer is not None
        await broker.writer.flush()
        for topic in topics:
            assert (await client.xpending(topic, "g"))["pending"] == 0
    finally:
        await broker.close()
        await client.aclose()
        await delete_keys(cluster.url, "rc.groups.*")


async def test_durable_publish_fails_when_no_replica_acknowledges(cluster: RedisCluster) -> None:
    """durable_replicas=1 on masters without replicas: the publish is stored on the master
    but WAIT finds no replica, so it is not confirmed (BrokerConnectionError)."""
    broker = RedisBroker(cluster.url, stream_topics=["rc.>"], durable_replicas=1,
                         durable_timeout=0.2)
    await broker.connect()
    try:
        with pytest.raises(BrokerConnectionError, match="0 of 1 replica"):
            await broker.publish("rc.durable", b"x", {})
    finally:
        await broker.close()
        await delete_keys(cluster.url, "rc.durable")


async def test_durable_publish_on_a_single_node_without_replica_fails(
    private_redis: PrivateRedis,
) -> None:
    broker = RedisBroker(private_redis.url, stream_topics=["rc.>"], durable_replicas=1,
                         durable_timeout=0.2)
    await broker.connect()
    try:
        assert not broker.clustered
        with pytest.raises(BrokerConnectionError, match="0 of 1 replica"):
            await broker.publish("rc.durable", b"x", {})
    finally:
        await broker.close()


async def test_reply_inboxes_are_sharded_channels(cluster: RedisCluster) -> None:
    """Requests work across nodes, and the replies travel by SPUBLISH to an SSUBSCRIBEd
    inbox on the inbox's shard (not broadcast to every node)."""
    from redis.asyncio import Redis

    from amb_core import AgentMessageBus, Message
    from amb_core.broker import INBOX_PREFIX

    server = AgentMessageBus(broker=RedisBroker(cluster.url_of(cluster.ports[1])))
    client = AgentMessageBus(broker=RedisBroker(cluster.url_of(cluster.ports[2])))
    await server.connect()
    await client.connect()
    try:
        async def answer(message: Message) -> int:
            return int(message.payload) * 2

        await server.subscribe("rc.rpc", answer)
        for i in range(20):
            reply = await client.request(Message(topic="rc.rpc", payload=i), timeout=5)
            assert reply.payload == i * 2
        broker = client.broker
        assert isinstance(broker, RedisBroker) and broker.pubsub is not None
        (inbox,) = broker.pubsub.sharded
        assert inbox.startswith(INBOX_PREFIX.encode())
        node = Redis(host="127.0.0.1", port=cluster.master_of(inbox.decode()))
        try:
            assert inbox in await node.execute_command("PUBSUB", "SHARDCHANNELS")
            assert inbox not in await node.execute_command("PUBSUB", "CHANNELS")
        finally:
            await node.aclose()
    finally:
        await client.close()
        await server.close()


def test_command_key_is_what_each_writer_command_routes_by() -> None:
    from amb_core.adapters.redis.protocol import command_key, pack, publish_head

    for key in (b"k", b"ct.x.\xc3\xa9", b"a" * 300, b"{tag}.x"):
        prefix, tail = publish_head(b"chan", key, 100, False, script=True)
        assert command_key(prefix + b"$4\r\nbody\r\n" + tail) == key
        assert command_key(pack(b"XACK", key, b"g", b"1-0", b"2-0")) == key
        assert command_key(pack(b"SPUBLISH", key, b"body")) == key


def test_missing_binaries_skip_locally_and_fail_when_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import redis_cluster

    monkeypatch.setattr(redis_cluster.shutil, "which", lambda name: None)
    monkeypatch.delenv("AMB_REQUIRE_BROKERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server and redis-cli"):
        redis_cluster.RedisCluster()
    monkeypatch.setenv("AMB_REQUIRE_BROKERS", "redis,redis-cluster")
    with pytest.raises(pytest.fail.Exception, match="requires redis-cluster"):
        redis_cluster.RedisCluster()

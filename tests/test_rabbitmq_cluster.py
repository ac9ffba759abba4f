"""RabbitMQBroker on a 3-node RabbitMQ cluster (private nodes joined with ``rabbitmqctl
join_cluster``, started here): several hosts tried in turn, group queues quorum queues with a
member on every node, a queue leader's node killed while 20 publishers send with nothing
confirmed lost, and the whole contract suite on the cluster.

Skipped when RabbitMQ or root is missing (a failure when ``AMB_REQUIRE_BROKERS`` names
``rabbitmq-cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
from tests.clusters import RabbitCluster, RabbitNode, unavailable
from tests.servers import HOST, free_port

from amb_core import AgentMessageBus, Message
from amb_core.adapters import RabbitMQBroker
from amb_core.adapters.rabbitmq.broker import split_hosts
from amb_core.runtime import ReconnectPolicy
from amb_core.testing import BrokerContract

NODES = 3
EXCHANGE = "amb.cluster"
FAST_RECONNECT = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, connect_timeout=6.0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    reason = RabbitCluster.available()
    if reason is not None:
        unavailable("rabbitmq-cluster", reason)
    nodes = RabbitCluster(NODES)
    try:
        try:
            nodes.start(timeout=240)
        except RuntimeError as exc:
            unavailable("rabbitmq-cluster", f"a {NODES}-node RabbitMQ cluster did not start: {exc}")
        yield nodes
    finally:
        nodes.remove()


def cluster_broker(urls: list[str], **options: object) -> RabbitMQBroker:
    options.setdefault("exchange", EXCHANGE)
    options.setdefault("reconnect", FAST_RECONNECT)
    return RabbitMQBroker(url=urls, **options)  # type: ignore[arg-type]


# --- several hosts -------------------------------------------------------------------------


def test_from_url_and_a_list_name_every_host() -> None:
    url = "amqp://agent:s3cret@h1:5672,h2:5673,h3/prod?exchange=events&heartbeat=30"
    broker = RabbitMQBroker.from_url(url)
    assert broker.urls == [
        "amqp://agent:s3cret@h1:5672/prod?heartbeat=30",
        "amqp://agent:s3cret@h2:5673/prod?heartbeat=30",
        "amqp://agent:s3cret@h3/prod?heartbeat=30",
    ]
    assert broker.url == broker.urls[0] and broker.exchange == "events"
    assert "s3cret" not in repr(broker)
    listed = RabbitMQBroker(url=["amqp://a/", "amqp://b/"])
    assert listed.urls == ["amqp://a/", "amqp://b/"]
    assert split_hosts("amqp://guest:guest@localhost:5672/") == ["amqp://guest:guest@localhost:5672/"]
    with pytest.raises(ValueError):
        RabbitMQBroker(url=[])


async def test_a_dead_first_host_is_skipped(cluster: RabbitCluster) -> None:
    dead = f"amqp://guest:guest@{HOST}:{free_port()}/"
    broker = cluster_broker([dead, cluster.urls[1]])
    await broker.connect()
    try:
        got: list[bytes] = []
        arrived = asyncio.Event()

        async def handler(delivery: object) -> None:
            got.append(delivery.body)  # type: ignore[attr-defined]
            arrived.set()

        topic = f"skip.{uuid.uuid4().hex[:8]}"
        sub = await broker.subscribe(topic, handler)  # type: ignore[arg-type]
        await broker.publish(topic, b"hello", {})
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [b"hello"]
        await sub.close()
    finally:
        await broker.close()


async def test_group_queues_are_quorum_queues_on_every_node(cluster: RabbitCluster) -> None:
    broker = cluster_broker(cluster.urls)
    await broker.connect()
    try:
        pattern = f"rep.{uuid.uuid4().hex[:8]}"

        async def handler(delivery: object) -> None:
            return None

        sub = await broker.subscribe(pattern, handler, group="workers")  # type: ignore[arg-type]
        queue = await asyncio.to_thread(cluster.queue, broker.group_queue_name("workers", pattern))
        assert queue["type"] == "quorum"
        assert sorted(queue["members"]) == sorted(n.node for n in cluster.nodes)  # type: ignore[arg-type]
        await sub.close()
        await broker.delete_group(pattern, "workers")
    finally:
        await broker.close()


# --- the contract suite on the cluster -------------------------------------------------------


class TestRabbitMQClusterContract(BrokerContract):
    wait = 15.0
    redelivery_wait = 30.0

    @pytest.fixture
    def broker_factory(self, cluster: RabbitCluster) -> Callable[[], RabbitMQBroker]:
        return lambda: cluster_broker(cluster.urls, queue_expires=60.0)

    @pytest.fixture
    def raw_publish(self, cluster: RabbitCluster) -> Callable[[str, bytes, dict[str, str]],
                                                              Awaitable[None]]:
        import aiormq
        from pamqp import commands as spec

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            connection = await aiormq.connect(cluster.urls[-1])
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
    def restartable(self, cluster: RabbitCluster) -> tuple[Callable[[], RabbitMQBroker],
                                                            Callable[[], Awaitable[None]]]:
        """Kill the node the broker is connected to and start it again: the broker goes on
        through another node meanwhile."""
        made: list[RabbitMQBroker] = []

        def factory() -> RabbitMQBroker:
            broker = cluster_broker(cluster.urls, queue_expires=60.0)
            made.append(broker)
            return broker

        async def restart() -> None:
            broker = made[-1]
            node = cluster.nodes[(broker._next_host - 1) % len(cluster.nodes)]
            await asyncio.to_thread(cluster.restart, node)

        return factory, restart


# --- a queue leader's node dies while 20 publishers send --------------------------------------


PUBLISHERS = 20


@pytest.mark.parametrize("connected_to", ["leader", "follower"])
async def test_queue_leader_killed_while_publishing_loses_nothing(
    cluster: RabbitCluster, connected_to: str
) -> None:
    """20 publishers send through the bus (confirms on) for 15 s; 3 s in, the node leading the
    group's quorum queue is SIGKILLed. Every publish that returned (confirmed) must reach the
    group. The buses are connected to that node (``leader``: they also lose their connection
    and fail over to the next host) or to another (``follower``)."""
    pattern = f"loss.{uuid.uuid4().hex[:8]}"
    group = "survivors"
    setup = cluster_broker(cluster.urls)
    await setup.connect()
    try:
        async def nothing(delivery: object) -> None:
            return None

        sub = await setup.subscribe(pattern, nothing, group=group)  # type: ignore[arg-type]
        await sub.close()
        queue_name = setup.group_queue_name(group, pattern)
    finally:
        await setup.close()
    queue = await asyncio.to_thread(cluster.queue, queue_name)
    leader: RabbitNode = cluster.node_named(str(queue["leader"]))
    others = [n.url for n in cluster.nodes if n is not leader]
    order = [leader.url, *others] if connected_to == "leader" else [*others, leader.url]

    consumer_bus = AgentMessageBus(broker=cluster_broker(order))
    producer_bus = AgentMessageBus(broker=cluster_broker(order))
    await consumer_bus.connect()
    await producer_bus.connect()
    received: set[int] = set()
    acked: set[int] = set()
    failed: list[BaseException] = []

    changed = asyncio.Event()

    async def handler(msg: Message) -> None:
        received.add(int(msg.payload))
        changed.set()

    try:
        await consumer_bus.subscribe(pattern, handler, consumer_group=group)
        stop_at = time.monotonic() + 15.0
        started = time.monotonic()
        timeline: list[tuple[float, str]] = []
        counter = iter(range(1_000_000))

        async def publisher() -> None:
            while time.monotonic() < stop_at:
                i = next(counter)
                try:
                    await producer_bus.publish(Message(topic=pattern, payload=i))
                except Exception as exc:  # not confirmed: it may or may not be stored
                    failed.append(exc)
                    timeline.append((round(time.monotonic() - started, 1), repr(exc)[:120]))
                    await asyncio.sleep(0.1)
                else:
                    acked.add(i)
                await asyncio.sleep(0.005)

        publishers = [asyncio.create_task(publisher()) for _ in range(PUBLISHERS)]
        await asyncio.sleep(3.0)
        killed_at = len(acked)
        assert killed_at > 100
        await asyncio.to_thread(leader.kill)
        await asyncio.gather(*publishers)
        assert len(acked) > killed_at + 100, (len(acked), killed_at, len(failed),
                                              timeline[:3], timeline[-3:],
                                              producer_bus.broker._next_host)
        deadline = time.monotonic() + 60
        while not received >= acked and time.monotonic() < deadline:
            changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
        missing = acked - received
        after = await asyncio.to_thread(cluster.queue, queue_name)
        assert after.get("leader") not in (None, "", leader.node), after
        assert not missing, f"{len(missing)} confirmed message(s) never arrived: " \
            f"{sorted(missing)[:10]}"
        print(f"\nconfirmed {len(acked)}, failed {len(failed)} "
              f"({failed[:1]!r}), received {len(received)}, "
              f"leader {leader.node} -> {after.get('leader')}")
    finally:
        await producer_bus.close(timeout=2.0)
        with contextlib.suppress(Exception):
            await consumer_bus.broker.delete_group(pattern, group)  # type: ignore[attr-defined]
        await consumer_bus.close(timeout=2.0)
        await asyncio.to_thread(leader.start)

"""NATSBroker on a 3-server NATS cluster with JetStream clustered (started here, on loopback):
streams replicated, a stream leader's loss survived with nothing lost, and the whole contract
suite in both modes.

Skipped when nats-server is missing (a failure when ``AMB_REQUIRE_BROKERS`` names
``nats-cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from tests.clusters import NATSCluster, unavailable

from amb_core import AgentMessageBus, Message
from amb_core.adapters.nats import NATSBroker, flush_in_order
from amb_core.runtime import ReconnectPolicy
from amb_core.testing import BrokerContract

TEST_ACK_WAIT = 3.0
FAST_RECONNECT = ReconnectPolicy(initial_delay=0.05, max_delay=0.5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[NATSCluster]:
    reason = NATSCluster.available()
    if reason is not None:
        unavailable("nats-cluster", reason)
    nodes = NATSCluster(3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.remove()


def cluster_broker(cluster: NATSCluster, jetstream: bool = True, *,
                   servers_order: list[str] | None = None, **options: object) -> NATSBroker:
    if jetstream:
        options.setdefault("ack_wait", TEST_ACK_WAIT)
    options.setdefault("reconnect", FAST_RECONNECT)
    return NATSBroker(servers=servers_order or cluster.urls, use_jetstream=jetstream,
                      **options)  # type: ignore[arg-type]


async def stream_info(cluster: NATSCluster, stream: str) -> object:
    import nats

    nc = await nats.connect(cluster.urls, connect_timeout=2)
    try:
        return await nc.jetstream(timeout=5).stream_info(stream)
    finally:
        await nc.close()


async def leader_of(cluster: NATSCluster, stream: str, timeout: float = 20.0) -> str:
    """The name of the server leading ``stream`` (waits for an election)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            info = await stream_info(cluster, stream)
            leader = info.cluster.leader if info.cluster else None  # type: ignore[attr-defined]
            if leader:
                return str(leader)
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream} has no leader after {timeout}s")
        await asyncio.sleep(0.2)


# --- replication -------------------------------------------------------------------------------


async def test_streams_and_consumers_get_three_replicas(cluster: NATSCluster) -> None:
    topic = f"rep{uuid.uuid4().hex[:8]}.orders"
    broker = cluster_broker(cluster)
    await broker.connect()
    try:
        assert broker._js is not None and broker._js.replicas() == 3

        async def handler(delivery: object) -> None:
            return None

        sub = await broker.subscribe(topic, handler, group="workers")  # type: ignore[arg-type]
        await broker.publish(topic, b"x", {})
        stream = broker._js.streams[topic.split(".")[0]]
        info = await stream_info(cluster, stream)
        assert info.config.num_replicas == 3  # type: ignore[attr-defined]
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # type: ignore[attr-defined]
        import nats

        nc = await nats.connect(cluster.urls)
        try:
            consumer = await nc.jetstream().consumer_info(
                stream, broker._js.consumer_name("workers", topic))
            # 0 = as many as the stream; a replicated consumer names its peers.
            assert consumer.config.num_replicas in (0, 3, None)
            assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2
        finally:
            await nc.close()
        await sub.close()
    finally:
        await broker.close()


async def test_one_server_url_learns_the_cluster(cluster: NATSCluster) -> None:
    """Given one URL, the client learns the others from the server's INFO (connect_urls)."""
    broker = NATSBroker(servers=[cluster.urls[1]], use_jetstream=True)
    await broker.connect()
    try:
        assert broker._js is not None and broker._js.replicas() == 3
    finally:
        await broker.close()


async def test_replicas_option_wins(cluster: NATSCluster) -> None:
    topic = f"one{uuid.uuid4().hex[:8]}.x"
    broker = cluster_broker(cluster, replicas=1)
    await broker.connect()
    try:
        await broker.publish(topic, b"x", {})
        assert broker._js is not None
        info = await stream_info(cluster, broker._js.streams[topic.split(".")[0]])
        assert info.config.num_replicas == 1  # type: ignore[attr-defined]
    finally:
        await broker.close()


def test_from_url_takes_every_server(cluster: NATSCluster) -> None:
    broker = NATSBroker.from_url(cluster.url + "?jetstream=true&replicas=3")
    assert broker.servers == cluster.urls
    assert broker.replicas == 3 and broker.use_jetstream


# --- a stream leader dies while 20 publishers send ------------------------------------------


PUBLISHERS = 20


@pytest.mark.parametrize("connected_to", ["leader", "follower"])
async def test_stream_leader_killed_while_publishing_loses_nothing(
    cluster: NATSCluster, connected_to: str
) -> None:
    """20 publishers send through the bus for 15 s; 2 s in, the server leading the topic's
    stream (and its group's consumer, which follows the stream's leader at creation) is
    SIGKILLed. Every publish that returned must reach the consumer group. Both buses are
    connected to the killed server (``leader``: they also lose their connection and fail over)
    or to the others (``follower``: only the stream's leader goes)."""
    topic = f"loss{uuid.uuid4().hex[:8]}.orders"
    setup = cluster_broker(cluster)
    await setup.connect()
    try:
        assert setup._js is not None
        stream = await setup._js.stream_for(topic)
    finally:
        await setup.close()
    leader = await leader_of(cluster, stream)
    first = [s.url for s in cluster.servers if (s.name == leader) == (connected_to == "leader")]
    order = first + [u for u in cluster.urls if u not in first]

    def pinned() -> NATSBroker:
        return cluster_broker(cluster, dont_randomize=True, servers_order=order)

    consumer_bus = AgentMessageBus(broker=pinned())
    producer_bus = AgentMessageBus(broker=pinned())
    await consumer_bus.connect()
    await producer_bus.connect()
    for bus in (consumer_bus, producer_bus):
        nc = bus.broker._nc  # type: ignore[attr-defined]
        assert nc is not None and nc.connected_url.geturl() == order[0]
    received: set[int] = set()
    arrived = asyncio.Event()
    acked: set[int] = set()
    failed: list[BaseException] = []

    async def handler(msg: Message) -> None:
        received.add(int(msg.payload))
        if acked and received >= acked and not sending:
            arrived.set()

    sending = True
    try:
        await consumer_bus.subscribe(topic, handler, consumer_group="survivors")
        await producer_bus.publish(Message(topic=topic, payload=-1))
        acked.add(-1)
        stop_at = time.monotonic() + 15.0
        counter = iter(range(1_000_000))

        async def publisher() -> None:
            while time.monotonic() < stop_at:
                i = next(counter)
                try:
                    await producer_bus.publish(Message(topic=topic, payload=i))
                except Exception as exc:  # not acknowledged: it may or may not be stored
                    failed.append(exc)
                else:
                    acked.add(i)
                await asyncio.sleep(0.005)

        publishers = [asyncio.create_task(publisher()) for _ in range(PUBLISHERS)]
        await asyncio.sleep(2.0)
        killed_at = len(acked)
        cluster.server(leader).kill()
        await asyncio.gather(*publishers)
        sending = False
        new_leader = await leader_of(cluster, stream)
        assert new_leader != leader
        assert len(acked) > killed_at + 100, (len(acked), killed_at, failed[:3])
        deadline = time.monotonic() + 60
        while not received >= acked and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), 1.0)
        missing = acked - received
        assert not missing, f"{len(missing)} acknowledged message(s) never arrived: " \
            f"{sorted(missing)[:10]}"
        print(f"\nacked {len(acked)}, failed {len(failed)} ({failed[:1]!r}), "
              f"received {len(received)}, leader {leader} -> {new_leader}")
    finally:
        sending = False
        await producer_bus.close(timeout=2.0)
        await consumer_bus.close(timeout=2.0)
        await asyncio.to_thread(cluster.start)


# --- the contract suite on the cluster ----------------------------------------------------------


class _ClusterContract(BrokerContract):
    jetstream = True
    wait = 15.0
    redelivery_wait = 20.0

    @pytest.fixture
    def broker_factory(self, cluster: NATSCluster) -> Callable[[], NATSBroker]:
        return lambda: cluster_broker(cluster, self.jetstream)

    @pytest.fixture
    async def raw_publish(self, cluster: NATSCluster) -> AsyncIterator[
            Callable[[str, bytes, dict[str, str]], Awaitable[None]]]:
        import nats

        nc = await nats.connect(cluster.urls)

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            await nc.publish(topic, body, headers=headers or None)
            await flush_in_order(nc)

        yield publish
        await nc.close()

    @pytest.fixture
    def restartable(self, cluster: NATSCluster) -> tuple[Callable[[], NATSBroker],
                                                           Callable[[], Awaitable[None]]]:
        """Restart the server the broker is connected to (the cluster keeps serving)."""
        made: list[NATSBroker] = []

        def factory() -> NATSBroker:
            broker = cluster_broker(cluster, self.jetstream)
            made.append(broker)
            return broker

        async def restart() -> None:
            nc = made[-1]._nc
            assert nc is not None and nc.connected_url is not None
            port = nc.connected_url.port
            server = next(s for s in cluster.servers if s.port == port)
            await asyncio.to_thread(cluster.restart, server.name)

        return factory, restart


class TestNATSClusterJetStreamContract(_ClusterContract):
    jetstream = True


class TestNATSClusterCoreContract(_ClusterContract):
    """Core mode, every connection on the same first server (``dont_randomize``): a core
    subscription's interest reaches the other servers of a cluster asynchronously (route
    propagation), so a publish from a connection on another server right after
    ``subscribe()`` returned can miss it (at-most-once; seen once in this suite's
    test_deadlines case). docs/nats.md says so."""

    jetstream = False

    @pytest.fixture
    def broker_factory(self, cluster: NATSCluster) -> Callable[[], NATSBroker]:
        return lambda: cluster_broker(cluster, False, dont_randomize=True)


async def test_three_urls_of_one_server_fall_back_to_one_replica() -> None:
    """Three URLs, one of them a single (not clustered) server: the guess of 3 replicas is
    refused (10074) and the stream is created with 1, with a warning."""
    from tests.conftest import require_server
    from tests.servers import HOST, free_port

    require_server("nats", HOST, 4222)
    live = f"nats://{HOST}:4222"
    dead = [f"nats://{HOST}:{free_port()}", f"nats://{HOST}:{free_port()}"]
    broker = NATSBroker(servers=[live, *dead], use_jetstream=True, dont_randomize=True)
    await broker.connect()
    topic = f"fallback{uuid.uuid4().hex[:8]}.x"
    try:
        assert broker._js is not None and broker._js.replicas() == 3
        await broker.publish(topic, b"x", {})
        name = broker._js.streams[topic.split(".")[0]]
        info = await broker._js.api().stream_info(name)
        assert info.config.num_replicas == 1
        await broker._js.api().delete_stream(name)
    finally:
        await broker.close()

"""Raw redis-py baselines for the Redis adapter's benchmark (issue 3), next to amb in one run.

Does the same work as ``amb bench`` the fastest reasonable way with the plain client:

- pub/sub: PUBLISH pipelined in batches, one subscriber reading with ``PubSub.get_message``;
- streams: XADD pipelined in batches, one consumer-group member reading with batched
  XREADGROUP (COUNT 1000) and acknowledging each batch with one XACK;
- request/response: PUBLISH a request carrying a reply channel, a responder PUBLISHes the
  answer, the requester matches it by id: sequential, and 50 in flight.

Then the same through amb (``AgentMessageBus`` on ``RedisBroker``): a plain ``await bus.publish``
loop on pub/sub, concurrent publishes on streams (each confirmed), ``bus.request`` for round trips.

    python benchmarks/raw_redis.py [--url redis://127.0.0.1:6379/0] [-n 50000] [--rr 5000]

With ``--cluster`` it then starts a Redis Cluster on loopback (3 masters with one replica each,
tests/redis_cluster.py; run from the repository root with it on PYTHONPATH) and runs the amb
rows again on the single node and on the cluster, side by side (plus streams over 12 topics,
which spread over the masters, and ``durable_replicas=1`` on the cluster).

Loopback only; everything it creates is under a random ``bench.<hex>`` prefix and deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as redis

BATCH = 1000


async def raw_pubsub(url: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    channel = f"bench.{uuid.uuid4().hex[:8]}.ps"
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    done = asyncio.Event()

    async def consume() -> None:
        seen = 0
        while seen < n:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                orjson.loads(message["data"])
                seen += 1
        done.set()

    reader = asyncio.create_task(consume())
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + BATCH, n)):
            pipe.publish(channel, orjson.dumps({"i": i}))
        await pipe.execute()
    await done.wait()
    elapsed = time.perf_counter() - started
    await reader
    await pubsub.aclose()
    await client.aclose()
    return n / elapsed


async def raw_streams(url: str, n: int) -> float:
    client = redis.Redis.from_url(url)
    reader_client = redis.Redis.from_url(url, socket_timeout=None)
    key = f"bench.{uuid.uuid4().hex[:8]}.stream"
    await client.xgroup_create(key, "g", id="$", mkstream=True)
    done = asyncio.Event()

    async def consume() -> None:
        seen = 0
        while seen < n:
            reply = await reader_client.xreadgroup("g", "c1", {key: ">"}, count=BATCH, block=2000)
            for _, entries in reply or []:
                ids = []
                for entry_id, fields in entries:
                    orjson.loads(fields[b"d"])
                    ids.append(entry_id)
                seen += len(ids)
                await reader_client.xack(key, "g", *ids)
        done.set()

    reader = asyncio.create_task(consume())
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + BATCH, n)):
            pipe.xadd(key, {"d": orjson.dumps({"i": i})}, maxlen=100_000, approximate=True)
        await pipe.execute()
    await done.wait()
    elapsed = time.perf_counter() - started
    await reader
    await client.delete(key)
    await client.aclose()
    await reader_client.aclose()
    return n / elapsed


async def raw_request_reply(url: str, n: int, in_flight: int) -> float:
    client = redis.Redis.from_url(url)
    server = redis.Redis.from_url(url)
    prefix = f"bench.{uuid.uuid4().hex[:8]}"
    requests, replies = f"{prefix}.rpc", f"{prefix}.inbox"
    server_sub, client_sub = server.pubsub(), client.pubsub()
    await server_sub.subscribe(requests)
    await client_sub.subscribe(replies)
    await server_sub.get_message(timeout=1.0)
    await client_sub.get_message(timeout=1.0)
    pending: dict[int, asyncio.Future[bytes]] = {}

    async def serve() -> None:
        while True:
            message = await server_sub.get_message(timeout=None)
            if message is None or message["type"] != "message":
                continue
            request = orjson.loads(message["data"])
            await server.publish(request["reply_to"], orjson.dumps({"id": request["id"],
                                                                    "ok": request["i"]}))

    async def collect() -> None:
        while True:
            message = await client_sub.get_message(timeout=None)
            if message is None or message["type"] != "message":
                continue
            reply = orjson.loads(message["data"])
            future = pending.pop(reply["id"], None)
            if future is not None and not future.done():
                future.set_result(message["data"])

    tasks = [asyncio.create_task(serve()), asyncio.create_task(collect())]
    loop = asyncio.get_running_loop()
    counter = iter(range(n))

    async def requester() -> None:
        for i in counter:
            future: asyncio.Future[bytes] = loop.create_future()
            pending[i] = future
            await client.publish(requests, orjson.dumps({"id": i, "i": i, "reply_to": replies}))
            await asyncio.wait_for(future, 10)

    started = time.perf_counter()
    await asyncio.gather(*(requester() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server_sub.aclose()
    await client_sub.aclose()
    await client.aclose()
    await server.aclose()
    return n / elapsed


# --- the same through amb --------------------------------------------------------------------


async def amb_pubsub(url: str, n: int) -> float:
    from amb_core import AgentMessageBus, Message
    from amb_core.adapters import RedisBroker

    topic = f"bench.{uuid.uuid4().hex[:8]}.ps"
    async with AgentMessageBus(broker=RedisBroker(url)) as bus:
        done = asyncio.Event()
        seen = 0

        async def handle(msg: Message) -> None:
            nonlocal seen
            seen += 1
            if seen == n:
                done.set()

        await bus.subscribe(topic, handle)
        started = time.perf_counter()
        for i in range(n):
            await bus.publish(Message(topic=topic, payload={"i": i}))
        await done.wait()
        return n / (time.perf_counter() - started)


async def amb_streams(url: str, n: int, *, concurrent: bool, topics: int = 1,
                      **options: int) -> float:
    from amb_core import AgentMessageBus, Message
    from amb_core.adapters import RedisBroker

    if topics > 1:
        return await amb_streams_spread(url, n, topics, **options)
    topic = f"bench.{uuid.uuid4().hex[:8]}.stream"
    broker = RedisBroker(url, stream_maxlen=100_000, **options)  # type: ignore[arg-type]
    async with AgentMessageBus(broker=broker) as bus:
        done = asyncio.Event()
        seen = 0

        async def handle(msg: Message) -> None:
            nonlocal seen
            seen += 1
            if seen == n:
                done.set()

        await bus.subscribe(topic, handle, consumer_group="bench")
        started = time.perf_counter()
        if concurrent:
            for first in range(0, n, BATCH):
                await asyncio.gather(*(bus.publish(Message(topic=topic, payload={"i": i}))
                                       for i in range(first, min(first + BATCH, n))))
        else:
            for i in range(n):
                await bus.publish(Message(topic=topic, payload={"i": i}))
        await done.wait()
        rate = n / (time.perf_counter() - started)
    await delete_keys(url, [topic])
    return rate


async def amb_streams_spread(url: str, n: int, topics: int, **options: int) -> float:
    """Concurrent confirmed publishes round-robin over ``topics`` topics, one group each."""
    from amb_core import AgentMessageBus, Message
    from amb_core.adapters import RedisBroker

    names = [f"bench.{uuid.uuid4().hex[:8]}.stream{t}" for t in range(topics)]
    broker = RedisBroker(url, stream_maxlen=100_000, **options)  # type: ignore[arg-type]
    async with AgentMessageBus(broker=broker) as bus:
        done = asyncio.Event()
        seen = 0

        async def handle(msg: Message) -> None:
            nonlocal seen
            seen += 1
            if seen == n:
                done.set()

        for name in names:
            await bus.subscribe(name, handle, consumer_group="bench")
        started = time.perf_counter()
        for first in range(0, n, BATCH):
            await asyncio.gather(*(bus.publish(Message(topic=names[i % topics], payload={"i": i}))
                                   for i in range(first, min(first + BATCH, n))))
        await done.wait()
        rate = n / (time.perf_counter() - started)
    await delete_keys(url, names)
    return rate


async def delete_keys(url: str, keys: list[str]) -> None:
    """Delete the benchmark's streams once its bus is closed (on a cluster, on their nodes)."""
    client = redis.Redis.from_url(url)
    try:
        clustered = bool((await client.info("cluster")).get("cluster_enabled"))
        if not clustered:
            await client.delete(*keys)
            return
    finally:
        await client.aclose()
    from redis.asyncio.cluster import RedisCluster

    cluster = RedisCluster.from_url(url)
    try:
        for key in keys:
            await cluster.delete(key)
    finally:
        await cluster.aclose()


async def amb_request_reply(url: str, n: int, in_flight: int) -> float:
    from amb_core import AgentMessageBus, Message
    from amb_core.adapters import RedisBroker

    topic = f"bench.{uuid.uuid4().hex[:8]}.rpc"
    async with AgentMessageBus(broker=RedisBroker(url)) as server, \
            AgentMessageBus(broker=RedisBroker(url)) as client:
        async def answer(msg: Message) -> dict[str, int]:
            return {"ok": msg.payload["i"]}

        await server.subscribe(topic, answer, max_concurrency=in_flight)
        counter = iter(range(n))

        async def requester() -> None:
            for i in counter:
                await client.request(Message(topic=topic, payload={"i": i}), timeout=10)

        started = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(in_flight)))
        return n / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=50_000, help="messages per throughput run")
    parser.add_argument("--rr", type=int, default=5_000, help="round trips per request run")
    parser.add_argument("--raw-only", action="store_true")
    parser.add_argument("--cluster", action="store_true",
                        help="then amb on a loopback Redis Cluster next to the single node")
    args = parser.parse_args()
    n, rr = min(args.n, 1_000_000), min(args.rr, 200_000)

    rows: list[tuple[str, str, Callable[[], Awaitable[float]]]] = [
        ("pub/sub e2e (msg/s)", "raw pipelined PUBLISH", lambda: raw_pubsub(args.url, n)),
        ("pub/sub e2e (msg/s)", "amb await publish loop", lambda: amb_pubsub(args.url, n)),
        ("streams e2e (msg/s)", "raw pipelined XADD + XREADGROUP",
         lambda: raw_streams(args.url, n)),
        ("streams e2e (msg/s)", "amb concurrent publish (confirmed)",
         lambda: amb_streams(args.url, n, concurrent=True)),
        ("streams e2e (msg/s)", "amb await publish loop (confirmed)",
         lambda: amb_streams(args.url, min(n, 10_000), concurrent=False)),
        ("request/reply (rt/s)", "raw sequential", lambda: raw_request_reply(args.url, rr, 1)),
        ("request/reply (rt/s)", "amb sequential", lambda: amb_request_reply(args.url, rr, 1)),
        ("request/reply (rt/s)", "raw 50 in flight",
         lambda: raw_request_reply(args.url, rr, 50)),
        ("request/reply (rt/s)", "amb 50 in flight",
         lambda: amb_request_reply(args.url, rr, 50)),
    ]
    if args.raw_only:
        rows = [row for row in rows if row[1].startswith("raw")]
    print(f"{'path':<22} {'client':<38} {'rate':>10}")
    for path, client, run in rows:
        rate = await run()
        print(f"{path:<22} {client:<38} {rate:>10,.0f}", flush=True)
    if args.cluster:
        await cluster_rows(args.url, n, rr)


async def cluster_rows(single: str, n: int, rr: int) -> None:
    """The amb rows on the single node and on a loopback cluster, in one run."""
    from tests.redis_cluster import RedisCluster

    cluster = await asyncio.to_thread(lambda: RedisCluster(masters=3, replicas=1).start())
    try:
        rows: list[tuple[str, Callable[[str], Awaitable[float]], bool]] = [
            ("pub/sub e2e, await publish loop", lambda url: amb_pubsub(url, n), True),
            ("streams e2e, concurrent confirmed", lambda url: amb_streams(
                url, n, concurrent=True), True),
            ("streams e2e, 12 topics, concurrent", lambda url: amb_streams(
                url, n, concurrent=True, topics=12), True),
            ("streams, 12 topics, durable_replicas=1", lambda url: amb_streams(
                url, n, concurrent=True, topics=12, durable_replicas=1), False),
            ("request/reply, 50 in flight (rt/s)", lambda url: amb_request_reply(url, rr, 50),
             True),
        ]
        print(f"\n{'amb (msg/s)':<40} {'single node':>12} {'cluster 3+3':>12}")
        for name, run, on_single in rows:
            alone = f"{await run(single):,.0f}" if on_single else "-"
            together = f"{await run(cluster.url):,.0f}"
            print(f"{name:<40} {alone:>12} {together:>12}", flush=True)
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

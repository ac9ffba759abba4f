"""Raw-client baselines for RabbitMQ, next to amb-core doing the same work, in one run.

Workloads (the same as ``amb bench``):

- throughput: publish N small messages ``{"i": i}`` (orjson) to a topic exchange and stop the clock
  when one consumer (its own exclusive queue, manual acks, prefetch 256) has decoded all of them.
  Publishing is a plain ``await publish(...)`` loop; with confirms on it is also run with 100
  publishes in flight (``asyncio.gather`` over a sliding window).
- request/response: a server consumes a queue and answers to ``reply_to`` on the default
  exchange; the client consumes ``amq.rabbitmq.reply-to`` (no-ack) with futures keyed by
  correlation id; sequential, then 50 in flight.

Each row prints wall time, rate, and CPU seconds of this process per message (the client side is
CPU-bound on loopback). Clients: raw aio-pika (the usual way to use it), raw aiormq (the layer
under aio-pika) and amb-core's RabbitMQBroker through AgentMessageBus.

    python benchmarks/raw_rabbitmq.py [--url amqp://guest:guest@127.0.0.1:5672/] [-n 20000]
        [--requests 5000] [--only aio-pika,aiormq,amb] [--profile amb-throughput]

``--cluster``: instead, start a 3-node RabbitMQ cluster of private nodes (tests/clusters.py;
needs root, run from the repository root) and run amb-core's throughput (confirms on, 100 in
flight) to a plain subscriber and to a consumer group (a quorum queue, replicated on every node)
on the ``--url`` node and on the cluster, alternating, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.metadata
import logging
import os
import pstats
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
from pamqp import commands as spec

EXCHANGE = "amb.bench.raw"
PREFETCH = 256
IN_FLIGHT = 100
RPC_CONCURRENCY = 50


@dataclass
class Row:
    client: str
    workload: str
    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.count * 1e6


class Clock:
    def __enter__(self) -> Clock:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


async def windowed(count: int, window: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """Run one(i) for i in range(count) with at most ``window`` in flight, in order of start."""
    pending: set[asyncio.Future[Any]] = set()
    for i in range(count):
        if len(pending) >= window:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
        pending.add(asyncio.ensure_future(one(i)))
    if pending:
        await asyncio.gather(*pending)


# --- aio-pika ---------------------------------------------------------------------------------


async def aio_pika_throughput(url: str, count: int, confirms: bool, window: int) -> Row:
    connection = await aio_pika.connect(url)
    try:
        consume_channel = await connection.channel(publisher_confirms=False)
        await consume_channel.set_qos(prefetch_count=PREFETCH)
        exchange = await consume_channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        topic = f"bench.{uuid.uuid4().hex[:8]}"
        queue = await consume_channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, topic)
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            orjson.loads(message.body)
            await message.ack()
            received += 1
            if received == count:
                done.set()

        await queue.consume(on_message)
        publish_channel = await connection.channel(publisher_confirms=confirms)
        publish_exchange = await publish_channel.get_exchange(EXCHANGE)

        async def publish(i: int) -> None:
            await publish_exchange.publish(
                aio_pika.Message(orjson.dumps({"i": i}), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=topic,
            )

        with Clock() as clock:
            if window == 1:
                for i in range(count):
                    await publish(i)
            else:
                await windowed(count, window, publish)
            await asyncio.wait_for(done.wait(), 120)
    finally:
        await connection.close()
    return Row("aio-pika", _throughput_name(confirms, window), count, clock.wall, clock.cpu)


async def aio_pika_requests(url: str, count: int, concurrency: int) -> Row:
    server = await aio_pika.connect(url)
    client = await aio_pika.connect(url)
    try:
        server_channel = await server.channel(publisher_confirms=False)
        await server_channel.set_qos(prefetch_count=concurrency)
        queue = await server_channel.declare_queue("", exclusive=True, auto_delete=True)

        async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            payload = orjson.loads(message.body)
            await server_channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(payload), content_type="application/json",
                                 correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )
            await message.ack()

        await queue.consume(serve)
        client_channel = await client.channel(publisher_confirms=False)
        futures: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = futures.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        reply_queue = await client_channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_queue.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()

        async def call(i: int) -> None:
            correlation_id = uuid.uuid4().hex
            future = loop.create_future()
            futures[correlation_id] = future
            await client_channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"i": i}), content_type="application/json",
                                 correlation_id=correlation_id,
                                 reply_to="amq.rabbitmq.reply-to"),
                routing_key=queue.name,
            )
            orjson.loads(await asyncio.wait_for(future, 30))

        with Clock() as clock:
            await windowed(count, concurrency, call)
    finally:
        await client.close()
        await server.close()
    return Row("aio-pika", _rpc_name(concurrency), count, clock.wall, clock.cpu)


# --- aiormq -----------------------------------------------------------------------------------


async def aiormq_throughput(url: str, count: int, confirms: bool, window: int) -> Row:
    connection = await aiormq.connect(url)
    try:
        consume_channel = await connection.channel(publisher_confirms=False)
        await consume_channel.basic_qos(prefetch_count=PREFETCH)
        await consume_channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        topic = f"bench.{uuid.uuid4().hex[:8]}"
        declared = await consume_channel.queue_declare("", exclusive=True, auto_delete=True)
        queue = declared.queue
        await consume_channel.queue_bind(queue, EXCHANGE, routing_key=topic)
        received = 0
        done = asyncio.Event()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal received
            orjson.loads(message.body)
            await consume_channel.basic_ack(message.delivery_tag, wait=False)
            received += 1
            if received == count:
                done.set()

        await consume_channel.basic_consume(queue, on_message)
        publish_channel = await connection.channel(publisher_confirms=confirms)

        async def publish(i: int) -> None:
            await publish_channel.basic_publish(
                orjson.dumps({"i": i}), exchange=EXCHANGE, routing_key=topic,
                properties=spec.Basic.Properties(content_type="application/json",
                                                 delivery_mode=2),
                wait=False,
            )

        with Clock() as clock:
            if window == 1:
                for i in range(count):
                    await publish(i)
            else:
                await windowed(count, window, publish)
            await asyncio.wait_for(done.wait(), 120)
    finally:
        await connection.close()
    return Row("aiormq", _throughput_name(confirms, window), count, clock.wall, clock.cpu)


async def aiormq_requests(url: str, count: int, concurrency: int) -> Row:
    server = await aiormq.connect(url)
    client = await aiormq.connect(url)
    try:
        server_channel = await server.channel(publisher_confirms=False)
        await server_channel.basic_qos(prefetch_count=concurrency)
        queue = (await server_channel.queue_declare("", exclusive=True, auto_delete=True)).queue

        async def serve(message: aiormq.abc.DeliveredMessage) -> None:
            payload = orjson.loads(message.body)
            props = message.header.properties
            await server_channel.basic_publish(
                orjson.dumps(payload), routing_key=props.reply_to or "",
                properties=spec.Basic.Properties(content_type="application/json",
                                                 correlation_id=props.correlation_id),
                wait=False,
            )
            await server_channel.basic_ack(message.delivery_tag, wait=False)

        await server_channel.basic_consume(queue, serve)
        client_channel = await client.channel(publisher_confirms=False)
        futures: dict[str, asyncio.Future[bytes]] = {}

        def on_reply(message: aiormq.abc.DeliveredMessage) -> None:
            future = futures.pop(message.header.properties.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await client_channel.basic_consume("amq.rabbitmq.reply-to", on_reply, no_ack=True)
        loop = asyncio.get_running_loop()

        async def call(i: int) -> None:
            correlation_id = uuid.uuid4().hex
            future = loop.create_future()
            futures[correlation_id] = future
            await client_channel.basic_publish(
                orjson.dumps({"i": i}), routing_key=queue,
                properties=spec.Basic.Properties(content_type="application/json",
                                                 correlation_id=correlation_id,
                                                 reply_to="amq.rabbitmq.reply-to"),
                wait=False,
            )
            orjson.loads(await asyncio.wait_for(future, 30))

        with Clock() as clock:
            await windowed(count, concurrency, call)
    finally:
        await client.close()
        await server.close()
    return Row("aiormq", _rpc_name(concurrency), count, clock.wall, clock.cpu)


# --- amb-core ---------------------------------------------------------------------------------


def _amb_bus(url: str | list[str], confirms: bool = True) -> Any:
    from amb_core import AgentMessageBus
    from amb_core.adapters import RabbitMQBroker

    return AgentMessageBus(broker=RabbitMQBroker(url=url, confirms=confirms))


async def amb_throughput(url: str | list[str], count: int, confirms: bool, window: int,
                         group: str | None = None) -> Row:
    from amb_core import Message

    topic = f"bench.{uuid.uuid4().hex[:8]}"
    async with _amb_bus(url, confirms) as bus:
        received = 0
        done = asyncio.Event()

        async def count_it(msg: Message) -> None:
            nonlocal received
            received += 1
            if received == count:
                done.set()

        await bus.subscribe(topic, count_it, consumer_group=group,
                            max_concurrency=IN_FLIGHT if group else 1)

        async def publish(i: int) -> None:
            await bus.publish(Message(topic=topic, payload={"i": i}))

        with Clock() as clock:
            if window == 1:
                for i in range(count):
                    await publish(i)
            else:
                await windowed(count, window, publish)
            await asyncio.wait_for(done.wait(), 120)
        if group:
            await bus.delete_consumer_group(topic, group)
    name = _throughput_name(confirms, window) + (", group (quorum)" if group else "")
    return Row("amb-core", name, count, clock.wall, clock.cpu)


async def cluster_run(url: str, count: int, runs: int) -> None:
    """amb-core throughput on one node next to a 3-node cluster, in one run."""
    import sys

    sys.path.insert(0, os.getcwd())  # tests/clusters.py, from the repository root
    from tests.clusters import RabbitCluster

    reason = RabbitCluster.available()
    if reason:
        raise SystemExit(f"--cluster: {reason}")
    cluster = RabbitCluster(3)
    started = time.monotonic()
    try:
        await asyncio.to_thread(cluster.start, 240)
        print(f"3-node RabbitMQ cluster up in {time.monotonic() - started:.0f}s")
        print(f"{'workload':<58} {'one node /s':>12} {'3-node cluster /s':>18} {'ratio':>6}")
        for group in (None, "bench"):
            single: list[Row] = []
            clustered: list[Row] = []
            for _ in range(runs):
                single.append(await amb_throughput(url, count, True, IN_FLIGHT, group))
                clustered.append(await amb_throughput(cluster.urls, count, True, IN_FLIGHT,
                                                      group))
            one = sorted(single, key=lambda r: r.seconds)[len(single) // 2]
            many = sorted(clustered, key=lambda r: r.seconds)[len(clustered) // 2]
            print(f"{one.workload:<58} {one.rate:>12,.0f} {many.rate:>18,.0f} "
                  f"{many.rate / one.rate:>6.2f}", flush=True)
    finally:
        await asyncio.to_thread(cluster.remove)


async def amb_requests(url: str, count: int, concurrency: int) -> Row:
    from amb_core import Message

    topic = f"bench.rpc.{uuid.uuid4().hex[:8]}"
    async with _amb_bus(url) as server, _amb_bus(url) as client:

        async def echo(msg: Message) -> Any:
            return msg.payload

        await server.subscribe(topic, echo, max_concurrency=concurrency)

        async def call(i: int) -> None:
            await client.request(Message(topic=topic, payload={"i": i}), timeout=30)

        with Clock() as clock:
            await windowed(count, concurrency, call)
    return Row("amb-core", _rpc_name(concurrency), count, clock.wall, clock.cpu)


# --- driver -----------------------------------------------------------------------------------


def _throughput_name(confirms: bool, window: int) -> str:
    mode = "confirms on" if confirms else "confirms off"
    flight = "publish loop" if window == 1 else f"{window} in flight"
    return f"throughput, {mode}, {flight}"


def _rpc_name(concurrency: int) -> str:
    return "request/response, sequential" if concurrency == 1 else (
        f"request/response, {concurrency} in flight"
    )


CLIENTS = {
    "aio-pika": (aio_pika_throughput, aio_pika_requests),
    "aiormq": (aiormq_throughput, aiormq_requests),
    "amb": (amb_throughput, amb_requests),
}
WORKLOADS = [
    ("throughput", False, 1),
    ("throughput", True, 1),
    ("throughput", True, IN_FLIGHT),
    ("request", 1, None),
    ("request", RPC_CONCURRENCY, None),
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get(
        "RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("-n", "--messages", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs per row")
    parser.add_argument("--only", default="aio-pika,aiormq,amb")
    parser.add_argument("--workloads", default="0,1,2,3,4",
                        help="indexes: 0 confirms off, 1 confirms on, 2 confirms on 100 in flight, "
                             "3 request/response sequential, 4 request/response 50 in flight")
    parser.add_argument("--profile", default="", help="client-workload to profile, e.g. amb-0")
    parser.add_argument("--cluster", action="store_true",
                        help="amb-core on one node next to a 3-node cluster (needs root)")
    args = parser.parse_args()
    args.messages = min(args.messages, 1_000_000)
    args.requests = min(args.requests, 200_000)
    if args.cluster:
        await cluster_run(args.url, args.messages, args.runs)
        return
    clients = [c for c in args.only.split(",") if c]
    rows: list[Row] = []
    wanted = {int(w) for w in args.workloads.split(",") if w}
    for index, (kind, a, b) in enumerate(WORKLOADS):
        if index not in wanted:
            continue
        for client in clients:
            throughput_fn, request_fn = CLIENTS[client]
            if kind == "throughput":
                def make(fn=throughput_fn, confirms=a, window=b):  # type: ignore[no-untyped-def]
                    return fn(args.url, args.messages, confirms, window)
            else:
                def make(fn=request_fn, concurrency=a):  # type: ignore[no-untyped-def]
                    return fn(args.url, args.requests, concurrency)
            if args.profile == f"{client}-{index}":
                profiler = cProfile.Profile()
                profiler.enable()
                row = await make()
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
                rows.append(row)
                continue
            runs = sorted([await make() for _ in range(args.runs)], key=lambda r: r.seconds)
            rows.append(runs[len(runs) // 2])
    print(f"broker: {aio_pika.connection.make_url(args.url).with_password('***')}  "
          f"aio-pika {aio_pika.__version__}, aiormq {importlib.metadata.version('aiormq')}")
    print(f"{'client':<9} {'workload':<40} {'count':>8} {'seconds':>8} {'per second':>11} "
          f"{'CPU us/msg':>10} {'vs aio-pika':>11}")
    baseline = {(r.workload): r.rate for r in rows if r.client == "aio-pika"}
    for row in rows:
        ratio = baseline.get(row.workload)
        vs = f"{row.rate / ratio:.2f}x" if ratio else ""
        print(f"{row.client:<9} {row.workload:<40} {row.count:>8,} {row.seconds:>8.3f} "
              f"{row.rate:>11,.0f} {row.cpu_us:>10.0f} {vs:>11}")


if __name__ == "__main__":
    # Raw aio-pika's RPC replies are mandatory publishes on a channel without confirms: aiormq
    # logs every one returned as "Unhandled message"; that is the baseline's noise, not amb's.
    logging.getLogger("aiormq.channel").setLevel(logging.CRITICAL)
    asyncio.run(main())

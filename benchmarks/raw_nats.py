"""Raw nats-py baselines next to amb-core over NATS, measured in one run.

    python benchmarks/raw_nats.py [--url nats://127.0.0.1:4222] [--messages 50000]
        [--requests 5000] [--concurrency 50] [--runs 3]

Every workload moves the same small JSON body, ``{"i": i}``; the raw rows do the work the fastest
reasonable way with plain nats-py (orjson both ways), the amb rows go through AgentMessageBus with
the NATS adapter (``amb_core.bench``: a plain ``await bus.publish(...)`` loop to one subscriber,
then request/response sequential and with ``concurrency`` in flight). Each row is the median of
``runs`` runs. Loopback only; N is bounded by the flags.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from amb_core import AgentMessageBus, Message
from amb_core.adapters.nats import NATSBroker


@dataclass
class Row:
    workload: str
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("inf")


async def median(runs: int, make: Callable[[], Awaitable[Row]]) -> Row:
    rows = [await make() for _ in range(runs)]
    return Row(rows[0].workload, rows[0].count, statistics.median(r.seconds for r in rows))


def _subject(kind: str) -> str:
    return f"bench.{kind}.{uuid.uuid4().hex[:8]}"


class _Counter:
    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.seen += 1
        if self.seen == self.count:
            self.done.set()

    async def wait(self, timeout: float = 120.0) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"only {self.seen} of {self.count} arrived") from None


# --- raw nats-py ---------------------------------------------------------------------------------


async def raw_core(url: str, count: int) -> Row:
    nc = await nats.connect(url)
    subject = _subject("core")
    counter = _Counter(count)

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        orjson.loads(msg.data)
        counter.hit()

    await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=count + 1)
    await nc.flush()
    started = time.perf_counter()
    for i in range(count):
        await nc.publish(subject, orjson.dumps({"i": i}))
    await counter.wait()
    elapsed = time.perf_counter() - started
    await nc.close()
    return Row("raw core: publish loop -> 1 subscriber", count, elapsed)


async def _stream(js: nats.js.JetStreamContext, root: str) -> None:
    await js.add_stream(StreamConfig(name=f"RAWBENCH_{root}", subjects=[f"{root}.>"],
                                     storage=StorageType.FILE, max_age=600))


async def raw_js(url: str, count: int, mode: str) -> Row:
    """mode: 'await' (each publish awaits its ack), 'async' (publish_async, acks pipelined);
    consumer: a core subscription (as amb's plain subscribe), or 'push' an acking push consumer."""
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    root = f"rawjs{uuid.uuid4().hex[:8]}"
    await _stream(js, root)
    subject = f"{root}.x"
    counter = _Counter(count)
    publish_mode, consumer = mode.split("+")

    if consumer == "core":
        async def on_core(msg: nats.aio.msg.Msg) -> None:
            orjson.loads(msg.data)
            counter.hit()
        await nc.subscribe(subject, cb=on_core, pending_msgs_limit=count + 1)
    else:
        async def on_js(msg: nats.aio.msg.Msg) -> None:
            orjson.loads(msg.data)
            await msg.ack()
            counter.hit()
        await js.subscribe(subject, cb=on_js, manual_ack=True, durable="raw",
                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                 deliver_policy=DeliverPolicy.NEW,
                                                 max_ack_pending=4000),
                           pending_msgs_limit=count + 1)
    await nc.flush()
    started = time.perf_counter()
    if publish_mode == "await":
        for i in range(count):
            await js.publish(subject, orjson.dumps({"i": i}))
    else:
        for i in range(count):
            await js.publish_async(subject, orjson.dumps({"i": i}))
        await js.publish_async_completed()
    await counter.wait()
    elapsed = time.perf_counter() - started
    await js.delete_stream(f"RAWBENCH_{root}")
    await nc.close()
    names = {
        "await+core": "raw JetStream: await each publish -> core sub",
        "async+core": "raw JetStream: publish_async -> core sub",
        "async+push": "raw JetStream: publish_async -> push, ack each",
    }
    return Row(names[mode], count, elapsed)


async def raw_requests(url: str, count: int, concurrency: int) -> list[Row]:
    server, client = await nats.connect(url), await nats.connect(url)
    subject = _subject("rpc")

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(orjson.dumps(orjson.loads(msg.data)))

    await server.subscribe(subject, cb=echo)
    await server.flush()
    await client.request(subject, b"{}", timeout=5)

    async def run(n: int) -> None:
        for i in range(n):
            reply = await client.request(subject, orjson.dumps({"i": i}), timeout=30)
            orjson.loads(reply.data)

    started = time.perf_counter()
    await run(count)
    rows = [Row("raw request/response, sequential", count, time.perf_counter() - started)]
    per = max(count // concurrency, 1)
    started = time.perf_counter()
    await asyncio.gather(*(run(per) for _ in range(concurrency)))
    rows.append(Row(f"raw request/response, {concurrency} in flight", per * concurrency,
                    time.perf_counter() - started))
    await server.close()
    await client.close()
    return rows


# --- amb-core over NATS ---------------------------------------------------------------------------


async def amb_throughput(url: str, count: int, *, jetstream: bool = False,
                         gather: int = 0, group: bool = False, label: str) -> Row:
    broker = NATSBroker(servers=[url], use_jetstream=jetstream)
    async with AgentMessageBus(broker=broker) as bus:
        counter = _Counter(count)

        async def on_msg(msg: Message) -> None:
            counter.hit()

        topic = _subject("amb")
        await bus.subscribe(topic, on_msg, consumer_group="bench" if group else None)
        started = time.perf_counter()
        if gather:
            async def publisher(start: int) -> None:
                for i in range(start, count, gather):
                    await bus.publish(Message(topic=topic, payload={"i": i}))
            await asyncio.gather(*(publisher(p) for p in range(gather)))
        else:
            for i in range(count):
                await bus.publish(Message(topic=topic, payload={"i": i}))
        await counter.wait()
        elapsed = time.perf_counter() - started
    return Row(label, count, elapsed)


async def amb_harness(url: str, messages: int, requests: int, concurrency: int,
                      runs: int) -> list[Row]:
    """The lead's harness (amb bench), when present."""
    from amb_core import bench

    rows: list[Row] = []
    for name, broker_url in (("core", url), ("JetStream", f"{url}?jetstream=true")):
        result = await bench.median_of(runs, lambda u=broker_url: bench.throughput(u, messages))
        rows.append(Row(f"amb bench {name}: publish loop -> 1 sub", result.count, result.seconds))
    for result in await bench.requests(url, requests, concurrency):
        rows.append(Row(f"amb bench {result.workload}", result.count, result.seconds))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--js-messages", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["raw", "amb", "all"], default="all")
    args = parser.parse_args()
    n, jn, runs, url = min(args.messages, 1_000_000), min(args.js_messages, 200_000), args.runs, \
        args.url
    rows: list[Row] = []
    if args.only in ("raw", "all"):
        rows.append(await median(runs, lambda: raw_core(url, n)))
        for mode in ("await+core", "async+core", "async+push"):
            count = jn if mode != "await+core" else min(jn, 5_000)
            rows.append(await median(runs, lambda m=mode, c=count: raw_js(url, c, m)))
        rows.extend(await raw_requests(url, args.requests, args.concurrency))
    if args.only in ("amb", "all"):
        rows.append(await median(runs, lambda: amb_throughput(
            url, n, label="amb core: publish loop -> 1 subscriber")))
        rows.append(await median(runs, lambda: amb_throughput(
            url, min(jn, 5_000), jetstream=True,
            label="amb JetStream: publish loop -> core sub")))
        rows.append(await median(runs, lambda: amb_throughput(
            url, jn, jetstream=True, gather=100,
            label="amb JetStream: 100 publishers -> core sub")))
        rows.append(await median(runs, lambda: amb_throughput(
            url, jn, jetstream=True, gather=100, group=True,
            label="amb JetStream: 100 publishers -> group")))
        try:
            import amb_core.bench  # noqa: F401
        except ImportError:
            pass
        else:
            rows.extend(await amb_harness(url, n, args.requests, args.concurrency, runs))
    print(f"nats: {url}  (median of {runs} runs)")
    print(f"{'workload':<52} {'count':>8} {'seconds':>8} {'msg/s':>10}")
    for row in rows:
        print(f"{row.workload:<52} {row.count:>8,} {row.seconds:>8.3f} {row.rate:>10,.0f}")


if __name__ == "__main__":
    asyncio.run(main())

"""Raw nats-py next to amb-core over NATS, the same work measured in one run, side by side.

    python benchmarks/raw_nats.py [--url nats://127.0.0.1:4222] [--messages 50000]
        [--js-messages 20000] [--requests 5000] [--concurrency 50] [--runs 5] [--only NAME]

Every workload moves the same small JSON body, ``{"i": i}``. The raw side does the work the
fastest reasonable way with plain nats-py (orjson both ways); the amb side is ordinary user code:
``Message(...)`` objects through ``AgentMessageBus`` with the NATS adapter at its defaults.

The two sides of a pair run alternately (raw, amb, raw, amb ...) and each reports the median
of ``--runs`` runs, so a machine that speeds up or slows down during the run (2 shared cores:
this process and nats-server) moves both sides alike. ``cpu/msg`` is this process's CPU time
per message or round trip. Loopback only.

Pairs (raw | amb):
- core: a publish loop to one subscriber | the same through the bus
- js-await: ``await js.publish`` in a loop -> core subscriber | ``await bus.publish`` in a loop
- js-pipelined: ``js.publish_async`` -> core subscriber | 100 concurrent ``bus.publish`` loops
- js-consumer: ``publish_async`` -> push consumer acking each | 100 publishers -> group member
- rr-sequential / rr-<concurrency>: request/response one at a time, then in flight

``--cluster``: instead, start a 3-server NATS cluster (tests/clusters.py, run from the repository
root) and run the JetStream pairs on the ``--url`` server (1 replica) and on the cluster (3
replicas, the adapter's default there), alternating, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

PUBLISHERS = 100


@dataclass
class Run:
    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


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


class _Clock:
    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def run(self, count: int) -> Run:
        return Run(count, self.wall, self.cpu / count)


def _root() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


# --- raw nats-py -------------------------------------------------------------------------------


async def raw_core(url: str, count: int) -> Run:
    nc = await nats.connect(url)
    subject = f"{_root()}.core"
    counter = _Counter(count)

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        orjson.loads(msg.data)
        counter.hit()

    await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=count + 1)
    await nc.flush()
    with _Clock() as clock:
        for i in range(count):
            await nc.publish(subject, orjson.dumps({"i": i}))
        await counter.wait()
    await nc.close()
    return clock.run(count)


async def raw_js(url: str | list[str], count: int, mode: str, replicas: int = 1) -> Run:
    """mode: await (each publish awaits its ack) | pipelined (publish_async) -> a core
    subscriber; consumer: publish_async -> a push consumer acking each message."""
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    root = _root()
    await js.add_stream(StreamConfig(name=f"RAWBENCH_{root}", subjects=[f"{root}.>"],
                                     storage=StorageType.FILE, max_age=600,
                                     num_replicas=replicas))
    subject = f"{root}.x"
    counter = _Counter(count)

    async def on_core(msg: nats.aio.msg.Msg) -> None:
        orjson.loads(msg.data)
        counter.hit()

    async def on_js(msg: nats.aio.msg.Msg) -> None:
        orjson.loads(msg.data)
        await msg.ack()
        counter.hit()

    if mode == "consumer":
        await js.subscribe(subject, cb=on_js, manual_ack=True, durable="raw",
                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                 deliver_policy=DeliverPolicy.NEW,
                                                 max_ack_pending=4000),
                           pending_msgs_limit=count + 1)
    else:
        await nc.subscribe(subject, cb=on_core, pending_msgs_limit=count + 1)
    await nc.flush()
    with _Clock() as clock:
        if mode == "await":
            for i in range(count):
                await js.publish(subject, orjson.dumps({"i": i}))
        else:
            for i in range(count):
                await js.publish_async(subject, orjson.dumps({"i": i}))
            await js.publish_async_completed()
        await counter.wait()
    await js.delete_stream(f"RAWBENCH_{root}")
    await nc.close()
    return clock.run(count)


async def raw_requests(url: str, count: int, concurrency: int) -> Run:
    server, client = await nats.connect(url), await nats.connect(url)
    subject = f"{_root()}.rpc"

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(orjson.dumps(orjson.loads(msg.data)))

    await server.subscribe(subject, cb=echo)
    await server.flush()
    await client.request(subject, b"{}", timeout=5)

    async def run(n: int) -> None:
        for i in range(n):
            reply = await client.request(subject, orjson.dumps({"i": i}), timeout=30)
            orjson.loads(reply.data)

    per = max(count // concurrency, 1)
    with _Clock() as clock:
        await asyncio.gather(*(run(per) for _ in range(concurrency)))
    await server.close()
    await client.close()
    return clock.run(per * concurrency)


# --- amb-core over NATS -------------------------------------------------------------------------


async def amb_throughput(url: str | list[str], count: int, *, jetstream: bool = False,
                         publishers: int = 1, group: bool = False) -> Run:
    broker = NATSBroker(servers=[url] if isinstance(url, str) else url, use_jetstream=jetstream)
    async with AgentMessageBus(broker=broker) as bus:
        counter = _Counter(count)

        async def on_msg(msg: Message) -> None:
            counter.hit()

        topic = f"{_root()}.x"
        sub = await bus.subscribe(topic, on_msg, consumer_group="bench" if group else None)

        async def publisher(start: int) -> None:
            for i in range(start, count, publishers):
                await bus.publish(Message(topic=topic, payload={"i": i}))

        with _Clock() as clock:
            await asyncio.gather(*(publisher(p) for p in range(publishers)))
            await counter.wait()
        await sub.unsubscribe()
        if jetstream:
            js = broker._conn().jetstream()
            assert broker._js is not None
            await js.delete_stream(await broker._js.stream_for(topic))
    return clock.run(count)


async def amb_requests(url: str, count: int, concurrency: int) -> Run:
    async with AgentMessageBus(broker=NATSBroker(servers=[url])) as server, \
            AgentMessageBus(broker=NATSBroker(servers=[url])) as client:
        topic = f"{_root()}.rpc"

        async def echo(msg: Message) -> object:
            return msg.payload

        await server.subscribe(topic, echo)  # one at a time, as nats-py runs a callback
        await client.request(Message(topic=topic, payload={}), timeout=5)

        async def run(n: int) -> None:
            for i in range(n):
                await client.request(Message(topic=topic, payload={"i": i}), timeout=30)

        per = max(count // concurrency, 1)
        with _Clock() as clock:
            await asyncio.gather(*(run(per) for _ in range(concurrency)))
    return clock.run(per * concurrency)


# --- pairs ----------------------------------------------------------------------------------------


Make = Callable[[], Awaitable[Run]]


def pairs(url: str, n: int, jn: int, requests: int,
          concurrency: int) -> dict[str, tuple[str, Make, str, Make]]:
    await_n = min(jn, 5_000)
    seq_n = min(requests, 3_000)
    return {
        "core": ("publish loop -> 1 subscriber", lambda: raw_core(url, n),
                 "publish loop -> 1 subscriber", lambda: amb_throughput(url, n)),
        "js-await": ("await js.publish loop -> core sub", lambda: raw_js(url, await_n, "await"),
                     "await bus.publish loop", lambda: amb_throughput(url, await_n,
                                                                      jetstream=True)),
        "js-pipelined": ("js.publish_async -> core sub", lambda: raw_js(url, jn, "pipelined"),
                         f"{PUBLISHERS} concurrent publishers -> sub",
                         lambda: amb_throughput(url, jn, jetstream=True,
                                                publishers=PUBLISHERS)),
        "js-consumer": ("publish_async -> push consumer, ack each",
                        lambda: raw_js(url, jn, "consumer"),
                        f"{PUBLISHERS} publishers -> group member",
                        lambda: amb_throughput(url, jn, jetstream=True,
                                               publishers=PUBLISHERS, group=True)),
        "rr-sequential": ("request/response, sequential", lambda: raw_requests(url, seq_n, 1),
                          "request/response, sequential", lambda: amb_requests(url, seq_n, 1)),
        f"rr-{concurrency}": (f"request/response, {concurrency} in flight",
                              lambda: raw_requests(url, requests, concurrency),
                              f"request/response, {concurrency} in flight",
                              lambda: amb_requests(url, requests, concurrency)),
    }


async def cluster_run(url: str, jn: int, runs: int) -> None:
    """The JetStream pairs on one server next to a 3-server cluster, in one run."""
    import sys

    sys.path.insert(0, os.getcwd())  # tests/clusters.py, from the repository root
    from tests.clusters import NATSCluster

    reason = NATSCluster.available()
    if reason:
        raise SystemExit(f"--cluster: {reason}")
    cluster = NATSCluster(3)
    try:
        await asyncio.to_thread(cluster.start)
        urls = cluster.urls
        work: list[tuple[str, Callable[[str | list[str], int], Make]]] = [
            ("raw js.publish_async -> core sub", lambda u, r: lambda: raw_js(u, jn, "pipelined",
                                                                              r)),
            ("raw publish_async -> push consumer",
             lambda u, r: lambda: raw_js(u, jn, "consumer", r)),
            (f"amb {PUBLISHERS} publishers -> sub",
             lambda u, r: lambda: amb_throughput(u, jn, jetstream=True, publishers=PUBLISHERS)),
            (f"amb {PUBLISHERS} publishers -> group member",
             lambda u, r: lambda: amb_throughput(u, jn, jetstream=True, publishers=PUBLISHERS,
                                                 group=True)),
        ]
        print(f"JetStream on {url} (1 replica) next to a 3-server cluster (3 replicas); "
              f"median of {runs}")
        print(f"{'workload':<40} {'one server /s':>14} {'3-server cluster /s':>20} {'ratio':>6}")
        for label, make in work:
            one, many = [], []
            for _ in range(runs):
                one.append(await make(url, 1)())
                many.append(await make(urls, 3)())
            one_rate = statistics.median(r.rate for r in one)
            many_rate = statistics.median(r.rate for r in many)
            print(f"{label:<40} {one_rate:>14,.0f} {many_rate:>20,.0f} "
                  f"{many_rate / one_rate:>6.2f}", flush=True)
    finally:
        await asyncio.to_thread(cluster.remove)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--js-messages", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", action="append", help="a pair's name; repeatable")
    parser.add_argument("--cluster", action="store_true",
                        help="JetStream on one server next to a 3-server cluster")
    args = parser.parse_args()
    n, jn = min(args.messages, 1_000_000), min(args.js_messages, 200_000)
    if args.cluster:
        await cluster_run(args.url, jn, args.runs)
        return
    table = pairs(args.url, n, jn, min(args.requests, 100_000), args.concurrency)
    print(f"nats: {args.url}  (each side: median of {args.runs} runs, raw and amb alternating)")
    print(f"{'pair':<14} {'raw nats-py':<42} {'per s':>9} {'cpu/msg':>8}   "
          f"{'amb-core':<38} {'per s':>9} {'cpu/msg':>8}  {'amb/raw':>7}")
    for name, (raw_label, raw, amb_label, amb) in table.items():
        if args.only and name not in args.only:
            continue
        raw_runs, amb_runs = [], []
        for _ in range(args.runs):
            raw_runs.append(await raw())
            amb_runs.append(await amb())
        raw_rate = statistics.median(r.rate for r in raw_runs)
        amb_rate = statistics.median(r.rate for r in amb_runs)
        raw_cpu = statistics.median(r.cpu for r in raw_runs) * 1e6
        amb_cpu = statistics.median(r.cpu for r in amb_runs) * 1e6
        print(f"{name:<14} {raw_label:<42} {raw_rate:>9,.0f} {raw_cpu:>6.1f}us   "
              f"{amb_label:<38} {amb_rate:>9,.0f} {amb_cpu:>6.1f}us  {amb_rate / raw_rate:>7.2f}",
              flush=True)


if __name__ == "__main__":
    asyncio.run(main())

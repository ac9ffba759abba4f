"""Routing cost as subscriptions multiply (issue 16), through the public API on MemoryBroker.

One ``events.>`` wildcard plus N other subscriptions (exact inboxes ``agent.<i>.inbox``, or a
mix where one in ten is a wildcard ``agent.<i>.*``), metrics off. Per N, 2,000 publishes each:

- **new topic**: every publish to a topic never seen before (``events.task.<k>``);
- **known topic**: the same topic every time;
- **known + churn**: the same topic, with one subscribe and one unsubscribe (an exact
  ``reply.<k>``, as a short-lived reply or stream subscription does) per 10 publishes.

Reported: microseconds per publish (median of ``--runs``), and memory per subscription
(tracemalloc over the N subscribes).

    python benchmarks/routing.py [--sizes 10,1000,10000,100000] [--runs 3] [--mix exact,mixed]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from typing import Any

from amb_core import AgentMessageBus, Message
from amb_core.adapters import MemoryBroker

PUBLISHES = 2_000


async def noop(msg: Message) -> None:
    return None


async def measure(size: int, mix: str, runs: int) -> dict[str, Any]:
    bus = AgentMessageBus(broker=MemoryBroker(log_size=0), observer=False)
    await bus.connect()
    await bus.subscribe("events.>", noop)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(size):
        wildcard = mix == "mixed" and i % 10 == 0
        await bus.subscribe(f"agent.{i}.*" if wildcard else f"agent.{i}.inbox", noop)
    per_subscription = (tracemalloc.get_traced_memory()[0] - before) / max(size, 1)
    tracemalloc.stop()
    counter = 0

    async def new_topics() -> float:
        nonlocal counter
        start = time.perf_counter()
        for _ in range(PUBLISHES):
            counter += 1
            await bus.publish(Message(topic=f"events.task.{counter}", payload=1))
        return time.perf_counter() - start

    async def known(churn: bool) -> float:
        nonlocal counter
        start = time.perf_counter()
        for i in range(PUBLISHES):
            if churn and i % 10 == 0:
                counter += 1
                sub = await bus.subscribe(f"reply.{counter}", noop)
                await sub.unsubscribe()
            await bus.publish(Message(topic="events.known", payload=1))
        return time.perf_counter() - start

    figures: dict[str, list[float]] = {"new topic": [], "known topic": [], "known + churn": []}
    await known(False)  # warm up
    for _ in range(runs):
        figures["new topic"].append(await new_topics())
        figures["known topic"].append(await known(False))
        figures["known + churn"].append(await known(True))
    await bus.close(timeout=5)
    result: dict[str, Any] = {
        name: statistics.median(values) / PUBLISHES * 1e6 for name, values in figures.items()
    }
    result["bytes/subscription"] = per_subscription
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000,100000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mix", default="exact,mixed")
    args = parser.parse_args()
    print(f"{'mix':6} {'subscriptions':>13} {'new topic µs':>13} {'known µs':>9} "
          f"{'known+churn µs':>15} {'bytes/sub':>10}")
    for mix in args.mix.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            r = await measure(size, mix, args.runs)
            print(f"{mix:6} {size:>13,} {r['new topic']:>13.1f} {r['known topic']:>9.1f} "
                  f"{r['known + churn']:>15.1f} {r['bytes/subscription']:>10,.0f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

"""Agent conversations through amb, per broker, in one run (issue 15).

- **stream**: one async generator handler yields N small chunks; chunks/s at the caller, next to
  the same broker's plain pub/sub rate through amb (a publish loop to one subscriber, N
  messages). Target: at least 0.5x.
- **first chunk**: the median time to the first chunk of a stream, next to the median round
  trip of one request to a plain handler. Target: at most 1.5x.
- **gather**: rounds/s of ``bus.gather`` over 10 responders (each its own bus), max_replies=10.

    python benchmarks/conversations.py [--urls memory://,redis://127.0.0.1:6379/0,...]
        [--chunks 10000] [--samples 50] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator

from amb_core import AgentMessageBus, Message
from amb_core.adapters import MemoryBroker, broker_from_url

DEFAULT_URLS = ("memory://,redis://127.0.0.1:6379/0,nats://127.0.0.1:4222,"
                "amqp://guest:guest@127.0.0.1:5672/")


def make_bus(url: str, shared: MemoryBroker | None) -> AgentMessageBus:
    broker = shared if shared is not None else broker_from_url(url)
    return AgentMessageBus(broker=broker, observer=False)


async def measure(url: str, chunks: int, samples: int, rounds: int) -> dict[str, float]:
    shared = MemoryBroker() if url.startswith("memory") else None
    prefix = f"bench.{uuid.uuid4().hex[:8]}"
    server, client = make_bus(url, shared), make_bus(url, shared)
    responders = [make_bus(url, shared) for _ in range(10)]
    for bus in (server, client, *responders):
        await bus.connect()
    try:
        async def writer(msg: Message) -> AsyncIterator[int]:
            for i in range(msg.payload):
                yield i

        async def echo(msg: Message) -> object:
            return msg.payload

        got = 0
        done = asyncio.Event()

        async def sink(msg: Message) -> None:
            nonlocal got
            got += 1
            if got == chunks:
                done.set()

        await server.subscribe(f"{prefix}.writer", writer)
        await server.subscribe(f"{prefix}.echo", echo)
        await server.subscribe(f"{prefix}.sink", sink)
        for bus in responders:
            await bus.subscribe(f"{prefix}.review", echo)

        start = time.perf_counter()
        for i in range(chunks):
            await client.publish(Message(topic=f"{prefix}.sink", payload=i))
        await asyncio.wait_for(done.wait(), 120)
        pubsub = chunks / (time.perf_counter() - start)

        start = time.perf_counter()
        count = 0
        async for _ in client.stream(Message(topic=f"{prefix}.writer", payload=chunks),
                                     timeout=120):
            count += 1
        assert count == chunks
        streamed = chunks / (time.perf_counter() - start)

        firsts, trips = [], []
        for _ in range(samples):
            start = time.perf_counter()
            stream = client.stream(Message(topic=f"{prefix}.writer", payload=1), timeout=10)
            await stream.__anext__()
            firsts.append(time.perf_counter() - start)
            async for _ in stream:
                pass
            start = time.perf_counter()
            await client.request(Message(topic=f"{prefix}.echo", payload=1), timeout=10)
            trips.append(time.perf_counter() - start)

        start = time.perf_counter()
        for _ in range(rounds):
            result = await client.gather(Message(topic=f"{prefix}.review", payload=1),
                                         timeout=10, max_replies=10)
            assert len(result.replies) == 10
        gathers = rounds / (time.perf_counter() - start)
    finally:
        for bus in (server, client, *responders):
            await bus.close(timeout=2)
    return {
        "pubsub": pubsub, "stream": streamed, "first": statistics.median(firsts) * 1e3,
        "trip": statistics.median(trips) * 1e3, "gather": gathers,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", default=DEFAULT_URLS)
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"{'broker':38} {'pub/sub/s':>10} {'chunks/s':>10} {'ratio':>6} {'first ms':>9} "
          f"{'rt ms':>7} {'ratio':>6} {'gather/s':>9}")
    for url in args.urls.split(","):
        r = await measure(url, args.chunks, args.samples, args.rounds)
        print(f"{url[:38]:38} {r['pubsub']:>10,.0f} {r['stream']:>10,.0f} "
              f"{r['stream'] / r['pubsub']:>6.2f} {r['first']:>9.2f} {r['trip']:>7.2f} "
              f"{r['first'] / r['trip']:>6.2f} {r['gather']:>9,.0f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

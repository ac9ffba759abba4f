"""Raw aiobotocore next to amb-core over SQS/SNS, on one moto server, measured in one run.

    python benchmarks/raw_sqs.py [--endpoint http://127.0.0.1:PORT] [--messages 1000]
        [--publishers 50] [--runs 3]

Without ``--endpoint`` a ``moto_server`` is started on a free loopback port (and stopped).
moto is not SQS: it does about 150 messages/s end to end here and its calls get slower as a
queue grows, so both sides consume while they produce and the server is reset between runs.
Figures are only comparable within one run (raw, amb, raw, amb ...; medians of ``--runs``).

Pairs (raw | amb), each moving ``{"i": i}`` from ``--publishers`` concurrent tasks to one
consumer that deletes what it handled:
- sns: ``sns.publish_batch`` of what the tasks have (<= 10) -> SNS -> a raw-delivery queue,
  ``receive_message`` 10 + ``delete_message_batch`` | ``bus.publish`` -> a consumer group
- sqs: ``sqs.send_message_batch`` straight to the queue (no SNS: the lower bound of the
  service) | the same amb side (amb always publishes through SNS)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

from aiobotocore.session import get_session

from amb_core import AgentMessageBus, Message
from amb_core.adapters.sqs import AWSSQSBroker

REGION = "us-east-1"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(script), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def reset(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset",
                                                       method="POST"), timeout=10):
        pass


async def _publishers(count: int, tasks: int, send: Any) -> None:
    async def one(start: int) -> None:
        for i in range(start, count, tasks):
            await send(i)
    await asyncio.gather(*(one(p) for p in range(tasks)))


class RawBatcher:
    """What a careful raw user writes: gather the tasks' sends of a loop turn into batches."""

    def __init__(self, flush: Any) -> None:
        self.flush_batch = flush
        self.pending: list[tuple[int, asyncio.Future[None]]] = []
        self.tasks: set[asyncio.Future[None]] = set()

    async def send(self, i: int) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((i, future))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self._go)
        await future

    def _go(self) -> None:
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), 10):
            task = asyncio.ensure_future(self._send(pending[start:start + 10]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[int, asyncio.Future[None]]]) -> None:
        await self.flush_batch([i for i, _ in batch])
        for _, future in batch:
            future.set_result(None)


async def raw_run(url: str, count: int, tasks: int, via_sns: bool) -> float:
    session = get_session()
    async with session.create_client("sqs", region_name=REGION, endpoint_url=url) as sqs, \
            session.create_client("sns", region_name=REGION, endpoint_url=url) as sns:
        queue = (await sqs.create_queue(QueueName="raw"))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
               )["Attributes"]["QueueArn"]
        topic = (await sns.create_topic(Name="raw"))["TopicArn"]
        await sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                            Attributes={"RawMessageDelivery": "true"})

        async def flush(items: list[int]) -> None:
            if via_sns:
                await sns.publish_batch(TopicArn=topic, PublishBatchRequestEntries=[
                    {"Id": str(n), "Message": orjson.dumps({"i": i}).decode()}
                    for n, i in enumerate(items)])
            else:
                await sqs.send_message_batch(QueueUrl=queue, Entries=[
                    {"Id": str(n), "MessageBody": orjson.dumps({"i": i}).decode()}
                    for n, i in enumerate(items)])

        seen = 0

        async def consume() -> None:
            nonlocal seen
            while seen < count:
                response = await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10,
                                                     WaitTimeSeconds=1)
                messages = response.get("Messages") or []
                for message in messages:
                    orjson.loads(message["Body"])
                if messages:
                    seen += len(messages)
                    await sqs.delete_message_batch(QueueUrl=queue, Entries=[
                        {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                        for n, m in enumerate(messages)])

        started = time.perf_counter()
        consumer = asyncio.ensure_future(consume())
        await _publishers(count, tasks, RawBatcher(flush).send)
        await asyncio.wait_for(consumer, 300)
        return count / (time.perf_counter() - started)


async def amb_run(url: str, count: int, tasks: int) -> float:
    bus = AgentMessageBus(broker=AWSSQSBroker(region_name=REGION, endpoint_url=url,
                                              queue_name="amb-bench", wait_time_seconds=1))
    await bus.connect()
    done = asyncio.Event()
    seen = 0

    async def handle(msg: Message) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            done.set()

    await bus.subscribe("bench.work", handle, consumer_group="workers")
    started = time.perf_counter()

    async def send(i: int) -> None:
        await bus.publish(Message(topic="bench.work", payload={"i": i}))

    await _publishers(count, tasks, send)
    await asyncio.wait_for(done.wait(), 300)
    rate = count / (time.perf_counter() - started)
    await bus.close()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    process = None
    url = args.endpoint
    if url is None:
        process, url = start_moto()
    try:
        results: dict[str, list[float]] = {"raw-sns": [], "raw-sqs": [], "amb": []}
        for _ in range(args.runs):
            for name in ("raw-sns", "amb", "raw-sqs"):
                reset(url)
                if name == "amb":
                    rate = await amb_run(url, args.messages, args.publishers)
                else:
                    rate = await raw_run(url, args.messages, args.publishers,
                                         via_sns=name == "raw-sns")
                results[name].append(rate)
                print(f"  {name:8} {rate:8.1f} msg/s", flush=True)
        medians = {name: statistics.median(rates) for name, rates in results.items()}
        print(f"\n{args.messages} messages, {args.publishers} publishers, median of "
              f"{args.runs} runs (moto at {url}):")
        for name, rate in medians.items():
            print(f"  {name:8} {rate:8.1f} msg/s")
        print(f"  amb / raw-sns = {medians['amb'] / medians['raw-sns']:.2f}x   "
              f"amb / raw-sqs = {medians['amb'] / medians['raw-sqs']:.2f}x")
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    asyncio.run(main())

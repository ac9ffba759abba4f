"""``amb demo``: a small multi-agent system showing every pattern of the user guide."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable

from amb_core import AgentMessageBus, Message, RetryPolicy


async def run_demo(url: str = "memory://", say: Callable[[str], None] = print) -> dict[str, object]:
    """Run the scenario and return what happened (the tests check it)."""
    outcome: dict[str, object] = {}
    async with AgentMessageBus.from_url(url) as bus:
        say(f"amb demo on {bus.broker!r}\n")

        # 1. Task and result, tied by a correlation id.
        say("1. task -> result with a correlation id")
        result_ready = asyncio.Event()
        results: list[Message] = []

        async def analyst(task: Message) -> None:
            words = len(str(task.payload["text"]).split())
            say(f"   analyst  got task {task.correlation_id}: {task.payload['action']}")
            await bus.publish(Message(topic="results.analysis", payload={"words": words},
                                      correlation_id=task.correlation_id))

        async def coordinator(result: Message) -> None:
            say(f"   coordinator got result for {result.correlation_id}: {result.payload}")
            results.append(result)
            result_ready.set()

        await bus.subscribe("tasks.analyze", analyst)
        await bus.subscribe("results.analysis", coordinator)
        await bus.publish(Message(topic="tasks.analyze", correlation_id="task-42",
                                  payload={"action": "analyze", "text": "agents talk over amb"}))
        await asyncio.wait_for(result_ready.wait(), 5)
        outcome["task_result"] = (results[0].correlation_id, results[0].payload)

        # 2. Request / response.
        say("\n2. request -> response")

        async def calculator(msg: Message) -> dict[str, int]:
            return {"sum": sum(msg.payload["values"])}

        await bus.subscribe("calculate", calculator)
        reply = await bus.request(Message(topic="calculate", payload={"values": [1, 2, 3]}),
                                  timeout=5)
        say(f"   calculator answered {reply.payload} (correlation {reply.correlation_id})")
        outcome["request_reply"] = reply.payload

        # 3. Wildcards.
        say("\n3. wildcard pub/sub: 'events.user.*' and 'events.>'")
        seen: dict[str, list[str]] = {"events.user.*": [], "events.>": []}
        all_seen = asyncio.Event()

        def watcher(pattern: str) -> Callable[[Message], object]:
            async def watch(msg: Message) -> None:
                seen[pattern].append(msg.topic)
                say(f"   [{pattern:<13}] {msg.topic}")
                if len(seen["events.>"]) == 3 and len(seen["events.user.*"]) == 2:
                    all_seen.set()
            return watch

        for pattern in seen:
            await bus.subscribe(pattern, watcher(pattern))
        for topic in ("events.user.created", "events.user.deleted", "events.order.paid"):
            await bus.publish(Message(topic=topic, payload={"topic": topic}))
        await asyncio.wait_for(all_seen.wait(), 5)
        outcome["wildcards"] = {k: sorted(v) for k, v in seen.items()}

        # 4. A work queue shared by three workers.
        say("\n4. work queue: 9 jobs, 3 workers in consumer group 'workers'")
        done_by: Counter[str] = Counter()
        jobs_done = asyncio.Event()

        def worker(name: str) -> Callable[[Message], object]:
            async def work(job: Message) -> None:
                await asyncio.sleep(0.01)  # pretend to work, letting the others take jobs
                done_by[name] += 1
                say(f"   {name} did job {job.payload['job']}")
                if sum(done_by.values()) == 9:
                    jobs_done.set()
            return work

        for name in ("worker-1", "worker-2", "worker-3"):
            await bus.subscribe("work", worker(name), consumer_group="workers")
        for job in range(9):
            await bus.publish(Message(topic="work", payload={"job": job}))
        await asyncio.wait_for(jobs_done.wait(), 5)
        say(f"   shared: {dict(sorted(done_by.items()))}")
        outcome["work_queue"] = dict(done_by)

        # 5. A failing handler: retried, then dead-lettered.
        say("\n5. a failing handler: retried, then dead-lettered to 'jobs.dlq'")
        dead_letters: list[Message] = []
        dead = asyncio.Event()

        async def fragile(job: Message) -> None:
            say(f"   fragile handler, attempt {job.attempt}: failing")
            raise RuntimeError("model endpoint unavailable")

        async def dead_letter_desk(letter: Message) -> None:
            dead_letters.append(letter)
            say(f"   dead letter: {letter.payload} after {letter.headers['amb-attempts']} "
                f"attempts, {letter.headers['amb-error-type']}: "
                f"{letter.headers['amb-error-message']}")
            dead.set()

        await bus.subscribe("jobs.dlq", dead_letter_desk)
        await bus.subscribe("jobs", fragile, consumer_group="g", dead_letter_topic="jobs.dlq",
                            retry=RetryPolicy(max_attempts=3, initial_delay=0.05))
        doomed = Message(topic="jobs", payload={"job": "summarise"})
        # The bus warns of every dead letter; this one is on purpose and printed by the desk, so its
        # warning (and only its: the filter matches this message's id) is left out.
        quiet = _DropWarningsAbout(doomed.id)
        bus_logger = logging.getLogger("amb_core.bus")
        bus_logger.addFilter(quiet)
        try:
            await bus.publish(doomed)
            await asyncio.wait_for(dead.wait(), 5)
        finally:
            bus_logger.removeFilter(quiet)
        outcome["dead_letter"] = dict(dead_letters[0].headers)

        # 6. An agent answering in a stream, then a vote of reviewers.
        say("\n6. an agent streams its answer; three reviewers vote on it (gather)")

        async def writer(msg: Message) -> AsyncIterator[dict[str, str]]:
            for word in f"a short note on {msg.payload['subject']}".split():
                await asyncio.sleep(0)  # a model would be producing tokens here
                yield {"token": word}

        await bus.subscribe("agents.writer", writer)
        tokens = [chunk.payload["token"] async for chunk in bus.stream(
            Message(topic="agents.writer", payload={"subject": "message buses"}), timeout=5)]
        say(f"   writer streamed {len(tokens)} chunks: {' '.join(tokens)}")
        outcome["stream"] = tokens

        def reviewer(name: str, verdict: str) -> Callable[[Message], object]:
            async def review(draft: Message) -> dict[str, str]:
                return {"reviewer": name, "verdict": verdict}
            return review

        for name, verdict in (("ada", "approve"), ("bo", "approve"), ("cy", "revise")):
            await bus.subscribe("agents.reviewers", reviewer(name, verdict))
        votes = await bus.gather(Message(topic="agents.reviewers", payload=" ".join(tokens)),
                                 timeout=5, max_replies=3)
        tally = Counter(reply.payload["verdict"] for reply in votes.replies)
        say(f"   votes: {dict(sorted(tally.items()))}")
        outcome["votes"] = dict(tally)

        # 7. Replay for audit.
        say("\n7. replay 'events.>' for audit")
        audit = [msg async for msg in bus.replay("events.>")]
        for msg in audit:
            say(f"   #{msg.position} {msg.topic} {msg.payload}")
        outcome["replay"] = [m.topic for m in audit]
        say("\ndone.")
    return outcome


class _DropWarningsAbout(logging.Filter):
    """Drops WARNING records that name one message id; everything else passes."""

    def __init__(self, message_id: str) -> None:
        super().__init__()
        self.message_id = message_id

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING or self.message_id not in record.getMessage()

"""Conversations as trees (amb_core.conversation), and `amb conversation` on JetStream."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from tests.conftest import require_server

from amb_core import AgentMessageBus, Message
from amb_core.cli import main
from amb_core.conversation import conversation_tree

JETSTREAM_URL = "nats://127.0.0.1:4222?jetstream=true"


def test_tree_by_causation_within_one_conversation() -> None:
    root = Message(topic="a.plan", payload=1, correlation_id="c")
    child = Message(topic="a.lookup", payload=2, correlation_id="c", causation_id=root.id)
    grandchild = Message(topic="a.log", payload=3, correlation_id="c", causation_id=child.id)
    sibling = Message(topic="a.notes", payload=4, correlation_id="c", causation_id=root.id)
    orphan = Message(topic="a.late", payload=5, correlation_id="c", causation_id="gone")
    other = Message(topic="a.plan", payload=6, correlation_id="elsewhere")
    roots = conversation_tree([root, child, grandchild, sibling, orphan, other], "c")
    assert [t.message for t in roots] == [root, orphan]
    assert [t.message for t in roots[0].caused] == [child, sibling]
    assert [t.message for t in roots[0].caused[0].caused] == [grandchild]
    assert roots[0].lines() == [
        f"a.plan  {root.id}", f"  a.lookup  {child.id}", f"    a.log  {grandchild.id}",
        f"  a.notes  {sibling.id}",
    ]


async def make_conversation(prefix: str) -> Message:
    async with AgentMessageBus.from_url(JETSTREAM_URL, observer=False) as bus:
        async def lookup(msg: Message) -> str:
            await bus.publish(Message(topic=f"{prefix}.log", payload="looked up"))
            return "found"

        async def planner(msg: Message) -> str:
            await bus.publish(Message(topic=f"{prefix}.notes", payload="planning"))
            reply = await bus.request(Message(topic=f"{prefix}.lookup", payload="q"), timeout=10)
            return str(reply.payload)

        await bus.subscribe(f"{prefix}.lookup", lookup)
        await bus.subscribe(f"{prefix}.plan", planner, max_concurrency=2)
        # JetStream keeps a request only once a stream captures its subject: a first publish
        # makes the prefix's stream.
        await bus.publish(Message(topic=f"{prefix}.start", payload="open"))
        ask = Message(topic=f"{prefix}.plan", payload="go", correlation_id=f"{prefix}-c")
        assert (await bus.request(ask, timeout=10)).payload == "found"
        return ask


def test_amb_conversation_prints_the_tree_from_a_replay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_server("nats", "127.0.0.1", 4222)
    prefix = f"conv{uuid.uuid4().hex[:8]}"
    ask = asyncio.run(make_conversation(prefix))
    assert main(["conversation", f"{prefix}-c", f"{prefix}.>", "--url", JETSTREAM_URL]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"{prefix}.plan  {ask.id}"
    children = sorted(line.split()[0] for line in lines if line.startswith("  ")
                      and not line.startswith("    "))
    assert children == [f"{prefix}.lookup", f"{prefix}.notes"]
    assert [line.split()[0] for line in lines if line.startswith("    ")] == [f"{prefix}.log"]
    assert f"4 message(s) of conversation {prefix}-c" in err

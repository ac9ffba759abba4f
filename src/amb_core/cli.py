"""The ``amb`` command: demo, publish, subscribe, request, serve, groups and bench over any
broker URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import orjson

from amb_core import AgentMessageBus, Message
from amb_core.broker import mask_url
from amb_core.config import url_from_env
from amb_core.conversation import conversation_tree
from amb_core.errors import AmbError

URL_HELP = ("broker URL (default: $AMB_URL, else the one of $REDIS_URL, $NATS_URL, "
            "$RABBITMQ_URL/$AMQP_URL, $KAFKA_SERVERS that is set, else memory://; now: {now})")


def _default_url_now() -> str:
    try:
        return mask_url(url_from_env())
    except ValueError as exc:
        return f"an error, {exc}"


def _payload(text: str) -> Any:
    """JSON when it parses as JSON, else the text as a string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"amb: header {pair!r} is not KEY=VALUE")
        headers[key] = value
    return headers


def _show(msg: Message) -> str:
    payload = msg.payload
    if isinstance(payload, bytes):
        payload = {"bytes": payload.decode("utf-8", "backslashreplace")}
    record = {
        "topic": msg.topic, "id": msg.id, "payload": payload, "headers": msg.headers,
        "correlation_id": msg.correlation_id, "attempt": msg.attempt,
        "timestamp": msg.timestamp,
    }
    return orjson.dumps({k: v for k, v in record.items() if v not in (None, {})}).decode()


IN_PROCESS_WARNING = (
    "amb: warning: memory:// is the in-memory broker, which lives only inside this one amb "
    "process: no other process sees what it publishes or can send it anything. Name a shared "
    "broker with --url or AMB_URL (e.g. redis://localhost:6379/0)."
)


def _bus(args: argparse.Namespace) -> AgentMessageBus:
    """The command's bus; a command that talks across processes warns on an in-process broker."""
    bus = AgentMessageBus.from_url(args.url)
    if bus.broker.in_process:
        print(IN_PROCESS_WARNING, file=sys.stderr, flush=True)
    return bus


async def _publish(args: argparse.Namespace) -> int:
    async with _bus(args) as bus:
        for _ in range(args.count):
            await bus.publish(Message(topic=args.topic, payload=_payload(args.payload),
                                      headers=_headers(args.header),
                                      correlation_id=args.correlation_id))
    print(f"published {args.count} message(s) to {args.topic}")
    return 0


async def _subscribe(args: argparse.Namespace) -> int:
    received = 0
    enough = asyncio.Event()

    async def show(msg: Message) -> None:
        nonlocal received
        print(_show(msg), flush=True)
        received += 1
        if args.count and received >= args.count:
            enough.set()

    async with _bus(args) as bus:
        await bus.subscribe(args.pattern, show, consumer_group=args.group)
        print(f"listening on {args.pattern} ({bus.broker!r}); Ctrl-C stops", file=sys.stderr)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(enough.wait(), args.timeout)
    return 0


async def _request(args: argparse.Namespace) -> int:
    bus = AgentMessageBus.from_url(args.url)
    if bus.broker.in_process:
        # A fresh process's in-memory broker has no subscribers: waiting out the timeout
        # would only hide the mistake.
        print(
            f"amb: request on {mask_url(args.url)} cannot be answered: the in-memory broker lives "
            f"only inside this one amb process, and nothing in it serves {args.topic!r}. Name the "
            "broker your service listens on with --url or AMB_URL (e.g. "
            f"redis://localhost:6379/0), and answer with `amb serve {args.topic} --url ...` or "
            "your own subscriber.", file=sys.stderr,
        )
        return 2
    async with bus:
        reply = await bus.request(
            Message(topic=args.topic, payload=_payload(args.payload),
                    headers=_headers(args.header)),
            timeout=args.timeout,
        )
    print(_show(reply))
    return 0


async def _serve(args: argparse.Namespace) -> int:
    fixed = None if args.reply is None else _payload(args.reply)
    served = 0
    enough = asyncio.Event()

    async with _bus(args) as bus:

        async def answer(msg: Message) -> None:
            nonlocal served
            print(_show(msg), flush=True)
            if msg.reply_to is None:
                return  # a plain publish: nobody waits for an answer
            await bus.reply(msg, msg.payload if fixed is None else fixed)
            served += 1
            if args.count and served >= args.count:
                enough.set()

        await bus.subscribe(args.topic, answer, consumer_group=args.group)
        group = f" in consumer group {args.group!r}" if args.group else ""
        mode = "echoing each request" if fixed is None else f"replying {args.reply}"
        print(f"serving {args.topic} on {mask_url(args.url)}{group}, {mode}; Ctrl-C stops",
              file=sys.stderr, flush=True)
        await enough.wait()
    return 0


async def _groups_delete(args: argparse.Namespace) -> int:
    async with AgentMessageBus.from_url(args.url) as bus:
        await bus.delete_consumer_group(args.pattern, args.group)
        print(f"deleted consumer group {args.group!r} of {args.pattern!r} on {bus.broker!r}")
    return 0


async def _dead_letters_list(args: argparse.Namespace) -> int:
    async with AgentMessageBus.from_url(args.url) as bus:
        destination = args.topic or bus.broker.default_dead_letter_topic
        letters = await bus.dead_letters(destination, limit=args.limit or None)
        for letter in letters:
            at = letter.dead_lettered_at
            print(orjson.dumps({
                "id": letter.message.id,
                "original_topic": letter.original_topic,
                "error_type": letter.error_type,
                "error_message": letter.error_message,
                "attempts": letter.attempts,
                "time": None if at is None else datetime.fromtimestamp(at, timezone.utc)
                .isoformat(),
                "position": letter.position,
            }).decode(), flush=True)
        print(f"{len(letters)} dead letter(s) at {destination}", file=sys.stderr)
    return 0


async def _dead_letters_redrive(args: argparse.Namespace) -> int:
    async with AgentMessageBus.from_url(args.url) as bus:
        destination = args.topic or bus.broker.default_dead_letter_topic
        result = await bus.redrive_dead_letters(destination, limit=args.limit or None)
        print(f"redriven {result.redriven} dead letter(s) from {destination} to their original "
              f"topics; removed {result.removed} from {destination}")
        if result.kept:
            print(f"kept at {destination}: {result.kept}", file=sys.stderr)
    return 0


async def _conversation(args: argparse.Namespace) -> int:
    async with AgentMessageBus.from_url(args.url) as bus:
        messages = [msg async for msg in bus.replay(args.pattern)]
    roots = conversation_tree(messages, args.correlation_id)
    for root in roots:
        for line in root.lines():
            print(line)
    count = sum(len(root.lines()) for root in roots)
    print(f"{count} message(s) of conversation {args.correlation_id} in {args.pattern}",
          file=sys.stderr)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from amb_core.demo import run_demo

    await run_demo(args.url)
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from amb_core import bench

    rows = await bench.run_all(args.url, args.messages, args.requests, args.concurrency,
                               runs=args.runs)
    ceiling = rows[0].rate if rows and rows[0].workload.startswith("ceiling") else None
    print(bench.format_table(args.url, rows, ceiling))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amb", description="amb-core, the Agent Message Bus: one API over any broker.",
        epilog="Broker URLs: memory:// redis:// rediss:// nats:// amqp:// amqps:// kafka:// "
               "sqs:// azuresb://  (default: $AMB_URL, else $REDIS_URL, $NATS_URL, "
               "$RABBITMQ_URL/$AMQP_URL or $KAFKA_SERVERS, else memory://)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v logs at INFO (connects, subscriptions, retries), -vv at DEBUG")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    url_help = URL_HELP.format(now=_default_url_now()).replace("%", "%%")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--url", default=None, help=url_help)
        return sub

    demo = command("demo", "run a small multi-agent scenario showing every pattern")
    demo.set_defaults(run=_demo)

    publish = command("publish", "publish a message (PAYLOAD is JSON, or else a string)")
    publish.add_argument("topic")
    publish.add_argument("payload")
    publish.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE")
    publish.add_argument("--correlation-id")
    publish.add_argument("-n", "--count", type=int, default=1, help="send it N times")
    publish.set_defaults(run=_publish)

    subscribe = command("subscribe", "print messages of a topic pattern (wildcards * and >)")
    subscribe.add_argument("pattern")
    subscribe.add_argument("-g", "--group", help="join this consumer group")
    subscribe.add_argument("-n", "--count", type=int, default=0, help="stop after N messages")
    subscribe.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    subscribe.set_defaults(run=_subscribe)

    request = command("request", "send a request and print the reply")
    request.add_argument("topic")
    request.add_argument("payload")
    request.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE")
    request.add_argument("--timeout", type=float, default=30.0)
    request.set_defaults(run=_request)

    serve = command("serve", "answer each request on TOPIC (wildcards * and >): echo its "
                             "payload back (the default), or reply a fixed PAYLOAD")
    serve.add_argument("topic")
    answer = serve.add_mutually_exclusive_group()
    answer.add_argument("--reply", metavar="PAYLOAD",
                        help="reply this (JSON, or else a string) to every request")
    answer.add_argument("--echo", action="store_true",
                        help="reply each request's own payload (the default)")
    serve.add_argument("-g", "--group", help="join this consumer group (servers share requests)")
    serve.add_argument("-n", "--count", type=int, default=0,
                       help="stop after answering N requests")
    serve.set_defaults(run=_serve)

    groups_help = "manage consumer groups' state on the broker"
    groups = commands.add_parser("groups", help=groups_help, description=groups_help)
    group_commands = groups.add_subparsers(dest="groups_command", required=True,
                                           metavar="COMMAND")
    delete_help = ("delete the broker-side state of consumer group GROUP on PATTERN (its "
                   "stream group, durable consumer or queue, with the messages waiting in it)")
    delete = group_commands.add_parser("delete", help=delete_help, description=delete_help)
    delete.add_argument("pattern")
    delete.add_argument("group")
    delete.add_argument("--url", default=None, help=url_help)
    delete.set_defaults(run=_groups_delete)

    letters_help = "look at and redrive the letters kept at a dead-letter destination"
    letters = commands.add_parser("dead-letters", help=letters_help, description=letters_help)
    letter_commands = letters.add_subparsers(dest="letters_command", required=True,
                                             metavar="COMMAND")
    for name, help_text, run in (
        ("list", "print the kept letters as JSON lines (id, original topic, error type and "
         "text, attempts, time), oldest first, without removing them", _dead_letters_list),
        ("redrive", "publish the kept letters back to their original topics with a fresh "
         "attempt count, then remove them where the broker can (it says where it cannot)",
         _dead_letters_redrive),
    ):
        sub = letter_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("topic", nargs="?", default=None,
                         help="the dead-letter topic (default: the broker's own)")
        sub.add_argument("--limit", type=int, default=0, help="at most N letters")
        sub.add_argument("--url", default=None, help=url_help)
        sub.set_defaults(run=run)

    conversation = command("conversation", "print one conversation (a correlation id) as the "
                           "tree of what caused what, replayed from a broker that keeps a log")
    conversation.add_argument("correlation_id")
    conversation.add_argument("pattern", help="the topics to replay, e.g. 'agents.>'")
    conversation.set_defaults(run=_conversation)

    bench = command("bench", "measure throughput and request/response round trips")
    bench.add_argument("--messages", type=int, default=200_000)
    bench.add_argument("--requests", type=int, default=20_000)
    bench.add_argument("--concurrency", type=int, default=50)
    bench.add_argument("--runs", type=int, default=3, help="report the median of N runs")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO)[args.verbose] if args.verbose < 2 else logging.DEBUG
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.url is None:
            args.url = url_from_env()  # here, so an ambiguous environment is reported as such
        with contextlib.suppress(KeyboardInterrupt):
            return int(asyncio.run(args.run(args)))
        return 130
    except (AmbError, ConnectionError, TimeoutError, ValueError) as exc:
        print(f"amb: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

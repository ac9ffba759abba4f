"""The NATS adapter's own machinery, checked without a server: the protocol parser that stands in
for nats-py's on the adapter's connections and the header encoder/parser (both compared with
nats-py's own on the same bytes), and the timeouts of acks and requests. The contract suite
(tests/test_contract_nats.py) runs the same code against the real server.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from amb_core.adapters.nats._fast import FastParser
from amb_core.adapters.nats.headers import encode_headers, parse_header_block
from amb_core.runtime import Deadlines

ROUTED = (1, 2)
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
                min_size=1, max_size=20)
VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                max_size=40)
SUBJECT = st.lists(TOKEN.filter(lambda t: "." not in t), min_size=1, max_size=4).map(".".join)
HEADERS = st.dictionaries(TOKEN.filter(lambda t: "." not in t), VALUE, max_size=6)


class Recorder:
    """What nats-py's Client is to a parser: the receiving end of every operation."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.is_reconnecting = False
        self.is_closed = False

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        self.events.append(("msg", sid, subject.decode("utf-8", "replace"),
                            reply.decode("utf-8", "replace"), data,
                            None if headers is None else parse_header_block(headers)))

    async def _process_ping(self) -> None:
        self.events.append(("ping",))

    async def _process_pong(self) -> None:
        self.events.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    async def _process_err(self, message: str) -> None:
        self.events.append(("err", message))


def fast_parser(recorder: Recorder) -> FastParser:
    def route(sid: int, subject: str, reply: str, headers: dict[str, str] | None,
              data: bytes) -> None:
        recorder.events.append(("msg", sid, subject, reply, data, headers))

    routes = {sid: functools.partial(route, sid) for sid in ROUTED}
    return FastParser(recorder, routes, Parser(recorder))  # type: ignore[arg-type]


@st.composite
def operations(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "hmsg", "status", "ping", "pong", "ok", "info", "err"]))
    if kind in ("msg", "hmsg", "status"):
        subject = draw(SUBJECT).encode()
        sid = draw(st.sampled_from([1, 2, 3]))  # 3: not routed, nats-py's own
        reply = draw(st.one_of(st.just(b""), SUBJECT.map(str.encode)))
        data = draw(st.binary(max_size=300))
        head = b"%s %d %s" % (subject, sid, reply) if reply else b"%s %d" % (subject, sid)
        if kind == "msg":
            return b"MSG %s %d\r\n%s\r\n" % (head, len(data), data)
        if kind == "hmsg":
            block = encode_headers(draw(HEADERS))
        else:
            status = draw(st.sampled_from([b"503", b"100 Idle Heartbeat", b"408 Request Timeout"]))
            block = b"NATS/1.0 " + status + b"\r\n\r\n"
        return b"HMSG %s %d %d\r\n%s%s\r\n" % (head, len(block), len(block) + len(data), block,
                                              data)
    return {
        "ping": b"PING\r\n",
        "pong": b"PONG\r\n",
        "ok": b"+OK\r\n",
        "info": b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        "err": b"-ERR 'Permissions Violation for Publish to x'\r\n",
    }[kind]


def feed(parser: Any, stream: bytes, cuts: list[int]) -> None:
    async def run() -> None:
        start = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            await parser.parse(stream[start:cut])
            start = cut

    asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(operations(), min_size=1, max_size=12), data=st.data())
def test_parser_agrees_with_nats_py_however_the_bytes_are_split(ops: list[bytes],
                                                                 data: st.DataObject) -> None:
    stream = b"".join(ops)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected, got = Recorder(), Recorder()
    feed(Parser(expected), stream, [])
    feed(fast_parser(got), stream, cuts)
    assert got.events == expected.events


@pytest.mark.parametrize("line", [b"FOO bar\r\n", b"MSG subject notasid 3\r\nabc\r\n",
                                  b"HMSG a 1 2\r\n", b"MSG a 1 -40\r\nabc\r\n",
                                  b"HMSG a 1 20 12\r\nNATS/1.0\r\n\r\n\r\n"])
def test_parser_refuses_what_is_not_the_protocol(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        feed(fast_parser(Recorder()), line, [])


@settings(max_examples=300, deadline=None)
@given(headers=HEADERS, status=st.sampled_from([b"", b" 503", b" 100 Idle Heartbeat",
                                                b" 409 Consumer Deleted"]))
def test_header_block_parsed_as_nats_py_parses_it(headers: dict[str, str], status: bytes) -> None:
    if status == b" 503":
        # What the server sends. (nats-py misreads a bare status followed by headers: it takes
        # the line break and the next line as the description.)
        headers = {}
    block = encode_headers(headers)
    block = block[:8] + status + block[8:]
    client = Client()  # only its header parsing, with nats-py's own line parser
    expected = asyncio.run(client._process_headers(block)) or {}
    assert parse_header_block(block) == expected


@settings(max_examples=300, deadline=None)
@given(headers=HEADERS)
def test_headers_round_trip(headers: dict[str, str]) -> None:
    stripped = {name: value.strip(" \t\n\r\x0b\x0c") for name, value in headers.items()}
    assert parse_header_block(encode_headers(headers)) == stripped


def test_header_values_cannot_inject_lines() -> None:
    block = encode_headers({"a": "x\r\nevil: 1", "b": "y\nz"})
    assert parse_header_block(block) == {"a": "x  evil: 1", "b": "y z"}


def test_bad_header_name_refused() -> None:
    with pytest.raises(ValueError):
        encode_headers({"bad name": "x"})


def test_info_is_still_nats_py_s() -> None:
    recorder = Recorder()
    info = {"server_id": "x", "connect_urls": ["a:4222"]}
    feed(fast_parser(recorder), b"INFO " + json.dumps(info).encode() + b"\r\nPING\r\n", [7])
    assert recorder.events == [("info", info), ("ping",)]


async def test_deadlines_expire_what_is_still_pending_in_deadline_order() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3000)]
    expired: list[int] = []

    def expire(index: int, future: asyncio.Future[None]) -> None:
        expired.append(index)
        future.set_exception(TimeoutError())

    due: dict[int, float] = {}
    for index, future in enumerate(futures):  # odd: short timeouts, even: longer ones
        timeout = 0.05 if index % 2 else 0.3
        due[index] = loop.time() + timeout  # a busy machine may take a while to add them all
        deadlines.add(timeout, future, functools.partial(expire, index))
    for future in futures[::3]:
        future.set_result(None)  # settled in time: never expired
    await asyncio.wait(futures, timeout=10)
    assert all(future.done() for future in futures)
    assert sorted(expired) == [i for i in range(3000) if i % 3]
    order = [due[i] for i in expired]
    assert all(a <= b + 0.01 for a, b in itertools.pairwise(order)), "not in due order"
    assert len(deadlines) == 0 and not deadlines._heap
    assert deadlines._timer is None


def test_a_subject_that_is_not_utf8_is_delivered_not_fatal() -> None:
    recorder = Recorder()
    feed(fast_parser(recorder), b"MSG a.\xff 1 2\r\nhi\r\nPING\r\n", [])
    assert recorder.events == [("msg", 1, "a.\ufffd", "", b"hi", None), ("ping",)]


@settings(max_examples=300, deadline=None)
@given(head=st.sampled_from([b"MSG ", b"HMSG "]),
       args=st.lists(st.one_of(st.integers(-5, 40).map(lambda i: str(i).encode()),
                               st.binary(min_size=1, max_size=6).filter(
                                   lambda b: not any(c in b for c in b" \t\r\n"))),
                     max_size=6),
       tail=st.binary(max_size=60).filter(lambda b: b"INFO" not in b))  # INFO: nats-py's
def test_garbled_messages_raise_protocol_error_or_pass(head: bytes, args: list[bytes],
                                                        tail: bytes) -> None:
    """A broken MSG/HMSG line never hangs the parser or escapes as anything but ProtocolError."""
    recorder = Recorder()
    try:
        feed(fast_parser(recorder), head + b" ".join(args) + b"\r\n" + tail, [])
    except ProtocolError:
        return
    assert len(recorder.events) <= 1 + tail.count(b"\r\n")  # and it got here: no loop

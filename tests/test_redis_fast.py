"""The Redis adapter's fast path (adapters/redis/_fast.py) against redis-py's own reply parsing:
random sequences of the one-line replies the publishing connection gets (integers, errors of
every kind redis-py knows), cut into random chunks, read by the bulk reader and by redis-py's
RESP2 parser from the same bytes; then the same against a real server, and the version gate."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio as redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis._parsers import _AsyncRESP2Parser
from redis.exceptions import ConnectionError as RedisConnectionError
from tests.conftest import require_server
from tests.test_contract_redis import HOST, PORT, URL

from amb_core.adapters.redis import _fast

# Not MOVED/ASK: cluster redirections, never sent by a single server.
ERROR_CODES = ["ERR", "NOSCRIPT", "WRONGTYPE", "LOADING", "OOM", "NOPERM", "READONLY",
               "BUSYGROUP", "NOGROUP", "EXECABORT", "WRONGPASS", "NOAUTH", "TRYAGAIN"]
TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                                      blacklist_categories=("Cs",)), max_size=60)
REPLY = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda n: b":%d" % n),
    st.tuples(st.sampled_from(ERROR_CODES), TEXT).map(
        lambda e: f"-{e[0]} {e[1]}".rstrip().encode()),
    st.sampled_from([b"-ERR invalid password", b"-ERR max number of clients reached",
                     b"-ERR", b"-"]),
)


def outcome(replies: list[Any] | None, raised: BaseException | None) -> list[Any]:
    """Replies as comparable values: ints, (type, text) of errors, then what was raised."""
    values = [r if isinstance(r, int) else (type(r), str(r)) for r in replies or []]
    if raised is not None:
        values.append(("raised", type(raised), str(raised)))
    return values


async def feed(reader: asyncio.StreamReader, data: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in sorted(set(cuts)):
        reader.feed_data(data[start:cut])
        start = cut
        await asyncio.sleep(0)
    reader.feed_data(data[start:])
    reader.feed_eof()


async def by_fast_path(data: bytes, count: int, cuts: list[int]) -> list[Any]:
    reader = asyncio.StreamReader()
    feeding = asyncio.ensure_future(feed(reader, data, cuts))
    try:
        return outcome(_fast.parse_lines(await _fast.read_lines(reader, count)), None)
    except RedisConnectionError as exc:
        return outcome(None, exc)
    finally:
        await feeding


class _Stream:
    """What redis-py's parser needs of a connection."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.encoder = None


async def by_redis_py(data: bytes, count: int, cuts: list[int]) -> list[Any]:
    reader = asyncio.StreamReader()
    feeding = asyncio.ensure_future(feed(reader, data, cuts))
    parser = _AsyncRESP2Parser(socket_read_size=65536)
    parser.on_connect(_Stream(reader))
    replies: list[Any] = []
    try:
        for _ in range(count):
            replies.append(await parser.read_response(disable_decoding=True))
    except RedisConnectionError as exc:
        # redis-py raises at the first connection-class error; the fast path reads the whole
        # batch first, then raises the same error.
        return outcome(replies, exc)
    finally:
        await feeding
    return outcome(replies, None)


@settings(max_examples=200, deadline=None)
@given(st.lists(REPLY, min_size=1, max_size=40), st.lists(st.integers(0, 4000), max_size=8))
def test_bulk_reader_reads_what_redis_py_reads(replies: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\r\n" for line in replies)
    cuts = [c % (len(data) + 1) for c in cuts]

    async def both() -> tuple[list[Any], list[Any]]:
        fast = await by_fast_path(data, len(replies), cuts)
        ours = await by_redis_py(data, len(replies), cuts)
        return fast, ours

    fast, reference = asyncio.run(both())
    raised = [v for v in reference if isinstance(v, tuple) and v[0] == "raised"]
    if raised:  # compare the error raised; replies before it are read by both
        assert fast == [raised[0]]
    else:
        assert fast == reference


async def test_bulk_reader_refuses_a_short_or_long_read() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b":1\r\n")
    reader.feed_eof()
    with pytest.raises(ConnectionError):
        await _fast.read_lines(reader, 2)
    reader = asyncio.StreamReader()
    reader.feed_data(b":1\r\n:2\r\n")
    with pytest.raises(ConnectionError):
        await _fast.read_lines(reader, 1)


def test_unexpected_reply_is_an_error_not_a_value() -> None:
    from redis.exceptions import InvalidResponse

    assert isinstance(_fast.parse_lines([b"+OK"])[0], InvalidResponse)


async def test_both_readers_agree_on_a_real_server() -> None:
    """The same pipeline (integers, a WRONGTYPE, a script error, NOSCRIPT) through each
    reader on a real connection."""
    require_server("redis", HOST, PORT)
    client = redis.Redis.from_url(URL)
    key = "amb-fast-path-test"
    commands = [("DEL", key), ("INCR", key), ("INCRBY", key, -5), ("LPUSH", key, "x"),
                ("EVAL", "return redis.error_reply('ERR from a script')", 0),
                ("EVALSHA", "0" * 40, 0), ("PUBLISH", "amb-fast-path-nobody", "x"),
                ("DEL", key)]
    results = []
    try:
        for read in (_fast.read_replies_bulk, _fast.read_replies_public):
            conn = client.connection_pool.make_connection()
            await conn.connect()
            for command in commands:
                await conn.send_command(*command)
            replies = await read(conn, len(commands))
            await conn.disconnect()
            results.append(outcome(replies, None))
    finally:
        await client.aclose()
    assert results[0] == results[1]
    assert results[0][:3] == [0, 1, -4] and results[0][-2:] == [0, 1]
    assert results[0][5][0].__name__ == "NoScriptError"


def test_the_version_gate(monkeypatch: pytest.MonkeyPatch,
                          caplog: pytest.LogCaptureFixture) -> None:
    assert _fast.client_version() in _fast.TESTED  # the installed redis-py was tested
    assert _fast.select(True) == (_fast.read_replies_bulk, "bulk")
    assert _fast.select(False) == (_fast.read_replies_public, "public")
    monkeypatch.setattr(_fast, "client_version", lambda: "99.0")
    with caplog.at_level(logging.INFO, logger="amb_core.adapters.redis"):
        assert _fast.select(True) == (_fast.read_replies_public, "public")
    assert "99.0" in caplog.text and "read_response" in caplog.text


async def test_the_broker_says_which_reader_it_uses() -> None:
    require_server("redis", HOST, PORT)
    from amb_core.adapters import RedisBroker

    for fast_path, expected in ((True, "bulk"), (False, "public")):
        broker = RedisBroker(URL, fast_path=fast_path)
        await broker.connect()
        try:
            assert broker.reply_reader == expected
            await broker.publish("amb-fast-path-nobody", b"x", {})
        finally:
            await broker.close()

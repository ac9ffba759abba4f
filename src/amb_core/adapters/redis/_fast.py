"""Every use of redis-py's private parts, in one place, switched on only where tested.

The publishing connection gets one one-line reply per pipelined command (an integer from the
publish script, PUBLISH or XACK, or an error line). redis-py's public ``read_response()`` parses
them one coroutine call at a time; reading the connection's ``asyncio.StreamReader``
(``Connection._reader``, private) in 64 KiB chunks and splitting lines is several times cheaper
per reply. Error lines become the exception redis-py itself would make, through its parser's
error table (``redis._parsers.BaseParser.parse_error``, private too).

:func:`select` picks the reader once per connect: the bulk reader for the redis-py versions in
:data:`TESTED` (``major.minor``) when the adapter's ``fast_path`` option is on, else the public
``read_response()`` one reply at a time. tests/test_redis_fast.py compares the two on random
reply sequences; the contract suite runs with the fast path off as well.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from amb_core.adapters._client import require

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

logger = logging.getLogger(__name__)

TESTED = frozenset({"8.1"})
"""redis-py ``major.minor`` versions the bulk reader was tested with."""

_CHUNK = 65536

Reply = int | Exception
ReadReplies = Callable[["AbstractConnection", int], Awaitable[list[Reply]]]


def client_version() -> str:
    redis = require("redis", "redis")
    return ".".join(str(redis.__version__).split(".")[:2])


def select(fast_path: bool) -> tuple[ReadReplies, str]:
    """The reply reader for the publishing connection, and a word saying which it is."""
    version = client_version()
    if not fast_path:
        logger.debug("redis-py %s: fast path off by option; replies read with read_response()",
                     version)
        return read_replies_public, "public"
    if version not in TESTED:
        logger.info("redis-py %s is not among the versions the Redis fast path was tested with "
                    "(%s); replies are read with the public read_response()", version,
                    ", ".join(sorted(TESTED)))
        return read_replies_public, "public"
    logger.debug("redis-py %s: the publishing connection's replies are read in bulk", version)
    return read_replies_bulk, "bulk"


def parse_error(line: bytes) -> Exception:
    """An error line (``-NOSCRIPT ...``) as the exception redis-py's parser makes of it; any
    other line that is not an integer is an unexpected reply."""
    exceptions = require("redis.exceptions", "redis")
    text = line[1:].decode("utf-8", "replace")
    if line[:1] != b"-":
        unexpected: Exception = exceptions.InvalidResponse(
            f"unexpected reply {text!r} on the publishing connection")
        return unexpected
    parsers = require("redis._parsers", "redis")
    error: Exception = parsers.BaseParser.parse_error(text)
    return error


def parse_lines(lines: list[bytes]) -> list[Reply]:
    """Integer lines as ints, the rest as exceptions; an error redis-py raises at once (a
    ConnectionError such as LOADING) is raised here too."""
    replies: list[Reply] = [
        int(line[1:]) if line[:1] == b":" else parse_error(line) for line in lines
    ]
    connection_error = require("redis.exceptions", "redis").ConnectionError
    for reply in replies:
        if isinstance(reply, connection_error):
            raise reply
    return replies


async def read_lines(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """``count`` single-line RESP replies (``:1``, ``-ERR ...``), read in bulk."""
    lines: list[bytes] = []
    rest = b""
    while len(lines) < count:
        data = await reader.read(_CHUNK)
        if not data:
            raise ConnectionError("Redis closed the connection")
        parts = (rest + data).split(b"\r\n")
        rest = parts.pop()
        lines.extend(parts)
    if rest or len(lines) != count:
        raise ConnectionError("unexpected data from Redis on the publishing connection")
    return lines


async def read_replies_bulk(conn: AbstractConnection, count: int) -> list[Reply]:
    reader: asyncio.StreamReader | None = getattr(conn, "_reader", None)
    if reader is None:  # disconnected under us: the public path raises the proper error
        return await read_replies_public(conn, count)
    return parse_lines(await read_lines(reader, count))


async def read_replies_public(conn: AbstractConnection, count: int) -> list[Reply]:
    """One ``read_response()`` per reply (redis-py's public API)."""
    response_error = require("redis.exceptions", "redis").ResponseError
    replies: list[Reply] = []
    for _ in range(count):
        try:
            reply: Any = await conn.read_response(disable_decoding=True)
        except response_error as exc:
            reply = exc
        replies.append(reply)
    return replies

"""NATSBroker (nats-py): core NATS subjects, or JetStream for persistence.

Topics are subjects, one to one; ``*`` and ``>`` are NATS's own wildcards. The envelope travels as
NATS headers with the ``ce-`` prefix (CloudEvents NATS binding, binary mode).

Core mode (``use_jetstream=False``, the default):

- plain subscribe = a core subscription; consumer group = a NATS queue group named by the group.
  Both are at-most-once: a message is delivered to whoever is subscribed when it is published;
  nothing is stored, nothing is redelivered, a crashed member's message is lost.
- publish buffers the message in the client and returns (nats-py flushes in the background).

JetStream mode (``use_jetstream=True``):

- publish goes to a stream and returns once the server acknowledged it (stored). It carries
  ``Nats-Msg-Id`` (``<id>:<topic>``), so publishing the same message again within the stream's
  duplicate window is stored once. Concurrent publishers (``asyncio.gather``) share the
  connection and their acks are pipelined. ``max_pending_acks=N`` lets publish return before
  the ack with up to N acks outstanding (errors surface on a later publish, ``flush()`` or
  ``close()``).
- streams: by default one stream per first topic segment, ``AMB_<root>`` with subjects
  ``<root>`` and ``<root>.>``, created on first use (or an existing stream that already captures
  the topic is reused). ``stream="NAME"`` (with ``stream_subjects``) uses one stream instead.
- consumer group = a durable pull consumer per (group, pattern) on that stream, explicit ack.
  A failed attempt is nak'ed with the retry policy's delay (the broker redelivers, and its
  delivery count becomes the message's attempt). After the last attempt the bus publishes the
  message to the dead-letter topic and then acks it (ack, not term: the dead letter is the
  record, and the original is done). Messages a member holds longer than half of ``ack_wait``
  get in-progress acks while they wait or run; a member that dies without acking has its
  messages redelivered to another member after ``ack_wait``; a member that unsubscribes naks
  what it held, for immediate redelivery.
- plain subscribe is still a core subscription (live messages, at-most-once);
  ``bus.replay(topic, since)`` reads the stream with an ordered consumer.

Request/reply is NATS's own (a reply inbox per connection); a request nobody serves fails fast
with :class:`~amb_core.errors.NoResponders`. See docs/nats.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import itertools
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import orjson

from amb_core.adapters._client import require
from amb_core.broker import (
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    mask_url,
)
from amb_core.errors import (
    BrokerConnectionError,
    NoResponders,
    NotConnected,
    RequestTimeout,
    UnsupportedFeature,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"
STATUS = "Status"
DESCRIPTION = "Description"
PENDING_MESSAGES = "Nats-Pending-Messages"
DEFAULT_MAX_PAYLOAD = 1024 * 1024
HEADER_ALLOWANCE = 4096
"""Bytes of a message's size kept for headers: NATS counts headers in ``max_payload``."""
_JS_API = "$JS.API"
_ACK = b"+ACK"
_PROGRESS = b"+WPI"
_NAK = b"-NAK"
_STREAM_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")

CORE_CAPABILITIES = Capabilities(
    wildcards=True,
    consumer_groups=True,
    persistent=False,
    redelivers_unacked=False,
    replay=False,
    ordering=True,
    at_least_once=False,
    headers=True,
    native_request_reply=True,
    reconnect=True,
    max_payload=DEFAULT_MAX_PAYLOAD - HEADER_ALLOWANCE,
)
JETSTREAM_CAPABILITIES = replace(
    CORE_CAPABILITIES,
    persistent=True,
    redelivers_unacked=True,
    replay=True,
    at_least_once=True,
)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


# --- the wire: headers -----------------------------------------------------------------------
# nats-py encodes headers with a regex and three string calls per key, and parses them with a
# generator over every character of every name: together over 70% of a small message's cost.
# These do the same job (same validation, same result) once per message instead of per byte.

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_valid_names: set[str] = set()


def encode_headers(headers: dict[str, str]) -> bytes:
    """``NATS/1.0`` header block; names are validated (ValueError), CR/LF in values blanked."""
    parts = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if name not in _valid_names:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid NATS header name")
            if len(_valid_names) < 4096:
                _valid_names.add(name)
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips, as nats-py does
_SPACE = re.compile(r"\s")
_parsed_lines: dict[str, tuple[str, str]] = {}
"""header line -> (name, value), for lines that repeat message after message (``ce-source:
amb-core``, ``content-type: application/json``); lines of names in ``_UNIQUE_PER_MESSAGE``
are never kept."""
_UNIQUE_PER_MESSAGE = frozenset(
    ["ce-id", "ce-time", "ce-correlationid", "ce-causationid", "ce-ambreplyto", MSG_ID,
     "traceparent", "tracestate"]
)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``name: value`` lines -> dict, as nats-py's ``Client._parse_header_lines`` (ASCII
    names without whitespace, values stripped, bad UTF-8 replaced), with lines that repeat
    from message to message looked up rather than parsed."""
    headers: dict[str, str] = {}
    known = _parsed_lines
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        pair = known.get(line)
        if pair is not None:
            headers[pair[0]] = pair[1]
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip(_ASCII_SPACE)
        if name not in _valid_names and (not name.isascii() or _SPACE.search(name)):
            continue
        value = value.strip(_ASCII_SPACE)
        headers[name] = value
        if name not in _UNIQUE_PER_MESSAGE:
            if len(known) >= 1024:
                known.clear()
            known[line] = (name, value)
    return headers


def parse_header_block(block: bytes) -> dict[str, str]:
    """A whole ``NATS/1.0[ status [description]]\r\n...`` block, status line included (as
    nats-py: ``Status`` and ``Description`` keys)."""
    first_line_end = block.find(b"\r\n")
    if first_line_end < 0:
        first_line_end = len(block)
    lines = parse_header_lines(block[first_line_end + 2:])
    if first_line_end <= 8:
        return lines
    # An inline status (NATS/1.0 503, NATS/1.0 100 Idle Heartbeat); header lines of the same
    # names win, as in nats-py.
    status, _, description = block[9:first_line_end].decode("utf-8", "replace").partition(" ")
    headers = {}
    if status.isdigit():
        headers[STATUS] = status
    if description:
        headers[DESCRIPTION] = description.strip()
    headers.update(lines)
    return headers


Route = Callable[[str, str, "dict[str, str] | None", bytes], None]
"""What receives one message of an own subscription: (subject, reply, headers, data). Called
synchronously by the parser; it must not raise and must not block."""


class FastParser:
    """Stands in for nats-py's protocol parser on our own connections (``Client._ps``).

    nats-py's parser deletes each message from the front of its buffer (a copy of everything
    behind it, per message), and every message then becomes a ``Msg`` in an ``asyncio.Queue``
    read by a task per subscription. This one walks the buffer by offset and hands messages of
    the adapter's own subscriptions (``routes``: sid -> :data:`Route`) straight to them.
    Everything else (other sids, PING, PONG, INFO, -ERR, +OK) goes to nats-py as before, so
    its own machinery (JetStream API replies, reconnects) sees no difference.
    """

    def __init__(self, nc: Client, routes: dict[int, Route], fallback: Any) -> None:
        self.nc = nc
        self.routes = routes
        self.fallback = fallback
        """a nats-py ``Parser``, given one complete control line at a time"""
        self.buf = bytearray()
        self.needed = 0
        """bytes the message at the front of ``buf`` needs in all, once known"""
        self._subjects: dict[bytes, str] = {}

    def reset(self) -> None:
        self.buf = bytearray()
        self.needed = 0
        self.fallback.reset()

    async def parse(self, data: bytes = b"") -> None:
        if self.buf:
            self.buf.extend(data)
            if len(self.buf) < self.needed:
                return  # a large message still arriving: nothing to parse yet
            data = bytes(self.buf)
            self.buf.clear()
        self.needed = 0
        end = len(data)
        pos = 0
        routes = self.routes
        subjects = self._subjects
        while pos < end:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            if data.startswith(b"MSG ", pos):
                args = data[pos + 4:eol].split()
                fields, header_size = 3, 0
            elif data.startswith(b"HMSG ", pos):
                args = data[pos + 5:eol].split()
                fields, header_size = 4, -1
            else:
                await self.fallback.parse(data[pos:eol + 2])
                if self.fallback.buf:  # a line nats-py would not take: not our protocol
                    raise _protocol_error("nats: unknown protocol")
                if self.nc.is_reconnecting or self.nc.is_closed:
                    return  # -ERR: nats-py reset us; the rest of this read is void
                pos = eol + 2
                continue
            try:
                if not fields <= len(args) <= fields + 1:
                    raise ValueError
                size = int(args[-1])
                if header_size:
                    header_size = int(args[-2])
                if not 0 <= header_size <= size:
                    raise ValueError
                subject, sid = args[0], int(args[1])
                reply = args[2] if len(args) > fields else b""
            except ValueError:
                raise _protocol_error("nats: malformed MSG") from None
            start = eol + 2
            stop = start + size
            if stop + 2 > end:
                self.needed = stop + 2 - pos
                break
            pos = stop + 2
            route = routes.get(sid)
            if route is None:
                await self.nc._process_msg(
                    sid, subject, reply, data[start + header_size:stop],
                    data[start:start + header_size] if header_size else None,  # type: ignore[arg-type]
                )
                continue
            name = subjects.get(subject)
            if name is None:
                name = subject.decode("utf-8", "replace")  # a foreign subject: never fatal
                if len(subjects) > 1024:
                    subjects.clear()
                subjects[subject] = name
            try:
                route(
                    name, reply.decode("utf-8", "replace") if reply else "",
                    parse_header_block(data[start:start + header_size])
                    if header_size else None,
                    data[start + header_size:stop],
                )
            except Exception:
                logger.exception("NATS delivery to %s failed", name)
        if pos < end:
            self.buf.extend(data[pos:])


def _protocol_error(text: str) -> Exception:
    return _nats_errors().ProtocolError(text)  # type: ignore[no-any-return]


_FAST_PATH_ATTRIBUTES = (
    "_flush_pending", "_flush_queue", "_max_pending_size", "_pending_data_size", "_pending",
    "_parse_header_lines", "_max_payload", "_ps", "_process_msg", "_status", "CONNECTED",
)
"""The nats-py internals the fast path uses; without any of them the adapter uses the public
API. (nats-py's ``stats`` counters do not count what goes through the fast path.)"""


def _nats_errors() -> Any:
    from nats import errors

    return errors


class NATSBroker(Broker):
    """NATS, core or JetStream.

    >>> NATSBroker(servers=["nats://localhost:4222"], use_jetstream=True)   # persistence
    >>> NATSBroker.from_url("nats://localhost:4222?jetstream=true&ack_wait=60")

    Credentials and TLS pass through to ``nats.connect`` (``user``/``password``, ``token``,
    ``user_credentials`` (a .creds file), ``nkeys_seed`` (a seed file), ``tls`` (an
    ``ssl.SSLContext``), ``tls_hostname``) and never appear in ``repr`` or log lines; other
    ``nats.connect`` keyword arguments go through ``**options``.

    JetStream options: ``stream``/``stream_subjects`` (one stream for everything instead of one
    per first topic segment, see the module docstring), ``stream_prefix``, ``storage``
    (``"file"`` or ``"memory"``), ``stream_max_age`` (seconds, None keeps messages until
    other limits), ``duplicate_window`` (seconds), ``ack_wait`` (seconds before an unacked
    message is redelivered), ``max_ack_pending`` (per group), ``group_start`` (``"new"``: a
    new group gets messages published from its creation on; ``"all"``: everything the stream
    holds), ``pull_batch`` (messages a group member fetches ahead of its handlers),
    ``publish_timeout`` (seconds to wait for the stream's ack), ``max_pending_acks``.
    """

    def __init__(
        self,
        servers: list[str] | str = "nats://localhost:4222",
        use_jetstream: bool = False,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        user_credentials: str | None = None,
        nkeys_seed: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        name: str | None = "amb-core",
        connect_timeout: float = 5.0,
        reconnect_time_wait: float = 2.0,
        max_reconnect_attempts: int = -1,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        pending_msgs_limit: int = 512 * 1024,
        pending_bytes_limit: int = 128 * 1024 * 1024,
        stream: str | None = None,
        stream_subjects: list[str] | None = None,
        stream_prefix: str = "AMB_",
        storage: str = "file",
        stream_max_age: float | None = None,
        duplicate_window: float = 120.0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 1000,
        group_start: str = "new",
        pull_batch: int = 64,
        pull_expires: float = 10.0,
        publish_timeout: float = 5.0,
        max_pending_acks: int = 0,
        fast_path: bool = True,
        **options: Any,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ValueError("servers must name at least one NATS URL")
        self.use_jetstream = use_jetstream
        if group_start not in ("new", "all"):
            raise ValueError("group_start must be 'new' or 'all'")
        if storage not in ("file", "memory"):
            raise ValueError("storage must be 'file' or 'memory'")
        if ack_wait <= 0 or publish_timeout <= 0 or connect_timeout <= 0 or pull_expires <= 0:
            raise ValueError("ack_wait, publish_timeout, connect_timeout, pull_expires must be > 0")
        if pull_batch < 1 or max_pending_acks < 0 or max_payload <= HEADER_ALLOWANCE:
            raise ValueError("pull_batch >= 1, max_pending_acks >= 0, max_payload > 4096")
        if stream is not None and not _STREAM_NAME_OK.fullmatch(stream):
            raise ValueError(f"stream name {stream!r}: use letters, digits, '_' and '-'")
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_time_wait = reconnect_time_wait
        self.max_reconnect_attempts = max_reconnect_attempts
        self.max_payload = max_payload
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.stream = stream
        self.stream_subjects = list(stream_subjects) if stream_subjects else None
        self.stream_prefix = stream_prefix
        self.storage = storage
        self.stream_max_age = stream_max_age
        self.duplicate_window = duplicate_window
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.group_start = group_start
        self.pull_batch = pull_batch
        self.pull_expires = pull_expires
        self.publish_timeout = publish_timeout
        self.max_pending_acks = max_pending_acks
        # Secrets live only here and go only to nats.connect.
        self._auth: dict[str, Any] = {
            key: value for key, value in {
                "user": user, "password": password, "token": token,
                "user_credentials": user_credentials, "nkeys_seed": nkeys_seed,
                "tls": tls, "tls_hostname": tls_hostname,
            }.items() if value is not None
        }
        self._options = options
        self._inbox_prefix = str(options.get("inbox_prefix", "_INBOX"))
        base = JETSTREAM_CAPABILITIES if use_jetstream else CORE_CAPABILITIES
        # Per instance: the mode and the server's payload limit decide them.
        self.capabilities = replace(base, max_payload=max_payload - HEADER_ALLOWANCE)

        self.fast_path = fast_path
        self._fast = False
        self._routes: dict[int, Route] = {}
        """sid -> receiver, for the subscriptions that FastParser hands messages to directly"""
        self._errors: Any = None
        self._connected_status = -1
        self._nc: Client | None = None
        self._ack_marker = f"{self._inbox_prefix}.amback."
        self._tokens = itertools.count(1)
        self._responses: dict[str, asyncio.Future[tuple[bytes, dict[str, str] | None]]] = {}
        self._response_prefix: str | None = None
        self._response_lock = asyncio.Lock()
        self._acks: dict[str, asyncio.Future[int]] = {}
        """ack token -> its publish's future, while the ack is outstanding"""
        self._deadlines = _Deadlines()
        """timeouts of outstanding publish acks and requests"""
        self._ack_prefix: str | None = None
        self._ack_lock = asyncio.Lock()
        self._window: asyncio.Semaphore | None = None
        self._window_failures: deque[BaseException] = deque()
        self._streams: dict[str, str] = {}
        """first topic segment (or a whole topic, after an overlap) -> stream name"""
        self._stream_lock = asyncio.Lock()
        self._pull_subs: set[_PullSubscription] = set()
        self._keeper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        servers = [mask_url(s) for s in self.servers]
        mode = "JetStream" if self.use_jetstream else "core"
        return f"NATSBroker(servers={servers!r}, use_jetstream={self.use_jetstream}) [{mode}]"

    @classmethod
    def from_url(cls, url: str) -> NATSBroker:
        """``nats://[user:password@]host:4222[,host2:4222][?jetstream=true&ack_wait=30&...]``.

        Query parameters: ``jetstream``, ``stream``, ``stream_prefix``, ``storage``,
        ``stream_max_age``, ``ack_wait``, ``max_ack_pending``, ``group_start``, ``pull_batch``,
        ``publish_timeout``, ``max_pending_acks``, ``connect_timeout``, ``name``, ``creds``
        (a .creds file), ``nkey`` (a seed file), ``token``. Credentials in the URL's user
        part pass to nats-py as they are.
        """
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        hosts = parts.netloc.rsplit("@", 1)
        if "," in hosts[-1]:
            creds = hosts[0] + "@" if len(hosts) == 2 else ""
            servers = [f"{parts.scheme}://{creds}{h}" for h in hosts[-1].split(",")]
        else:
            servers = [base]
        kwargs: dict[str, Any] = {}
        floats = ("stream_max_age", "ack_wait", "publish_timeout", "connect_timeout",
                  "duplicate_window", "pull_expires", "reconnect_time_wait")
        ints = ("max_ack_pending", "pull_batch", "max_pending_acks", "max_payload")
        for key, value in query.items():
            if key == "jetstream":
                continue
            if key in floats:
                kwargs[key] = float(value)
            elif key in ints:
                kwargs[key] = int(value)
            elif key in ("stream", "stream_prefix", "storage", "group_start", "name", "token"):
                kwargs[key] = unquote(value)
            elif key == "creds":
                kwargs["user_credentials"] = unquote(value)
            elif key == "nkey":
                kwargs["nkeys_seed"] = unquote(value)
            else:
                raise ValueError(f"unknown NATS URL parameter {key!r} in {mask_url(url)!r}")
        return cls(servers=servers, use_jetstream=_truthy(query.get("jetstream", "")), **kwargs)

    # --- connection ------------------------------------------------------------------------

    def _conn(self) -> Client:
        nc = self._nc
        if nc is None or nc.is_closed:
            raise NotConnected("NATSBroker is not connected")
        return nc

    async def connect(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        require("nats", "nats")
        from nats.aio.client import Client as NatsClient

        nc = NatsClient()
        self._fast = self.fast_path and all(hasattr(nc, a) for a in _FAST_PATH_ATTRIBUTES)
        self._routes = {}
        if self._fast:
            # This connection only: nats-py calls both through the instance.
            nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]
            nc._ps = FastParser(nc, self._routes, nc._ps)  # type: ignore[assignment]
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=self.servers,
                    name=self.name,
                    connect_timeout=max(int(self.connect_timeout), 1),
                    reconnect_time_wait=self.reconnect_time_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=self.max_reconnect_attempts,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self._auth,
                    **self._options,
                ),
                self.connect_timeout,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            servers = ", ".join(mask_url(s) for s in self.servers)
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else repr(exc)
            raise BrokerConnectionError(f"could not connect to NATS at {servers}: {reason}") \
                from None
        if nc.max_payload < self.max_payload:
            logger.warning(
                "NATS server max_payload is %d bytes, below the %d this broker was configured "
                "with; pass max_payload=%d", nc.max_payload, self.max_payload, nc.max_payload,
            )
        self._errors = _nats_errors()
        self._connected_status = NatsClient.CONNECTED
        self._nc = nc
        if self.use_jetstream:
            if self.max_pending_acks:
                self._window = asyncio.Semaphore(self.max_pending_acks)
            self._keeper = asyncio.get_running_loop().create_task(self._keep_pulls())

    async def close(self) -> None:
        nc = self._nc
        if nc is None:
            return
        for sub in list(self._pull_subs):
            with contextlib.suppress(Exception):
                await sub.close()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._acks and not nc.is_closed:
            with contextlib.suppress(Exception):
                await self.flush()
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=max(int(self.publish_timeout), 1))
            with contextlib.suppress(Exception):
                await nc.close()
        for future in list(self._responses.values()) + list(self._acks.values()):
            if not future.done():
                future.set_exception(NotConnected("the NATS connection was closed"))
        self._responses.clear()
        self._acks.clear()
        self._deadlines.clear()
        self._response_prefix = None
        self._ack_prefix = None
        self._streams.clear()
        self._nc = None

    async def _on_error(self, exc: Exception) -> None:
        logger.debug("NATS client error: %r", exc)

    async def _on_disconnected(self) -> None:
        logger.info("NATS disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        logger.info("NATS reconnected")
        for sub in list(self._pull_subs):
            sub.restart_pull()

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Core: buffered, returns at once. JetStream: returns once the stream stored it."""
        if self.use_jetstream:
            await self._js_publish(topic, body, headers)
            return
        nc = self._nc
        if nc is None:
            raise NotConnected("NATSBroker is not connected")
        try:
            await self._send(nc, topic, body, headers)
        except Exception as exc:
            raise self._publish_error(exc, topic) from exc

    async def send_reply(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        """Replies go to the requester's inbox over core NATS, in both modes."""
        try:
            await self._send(self._conn(), reply_to, body, headers)
        except NotConnected:
            raise
        except Exception as exc:
            raise self._publish_error(exc, reply_to) from exc

    def _publish_error(self, exc: Exception, topic: str) -> Exception:
        from nats import errors

        if isinstance(exc, errors.MaxPayloadError):
            return ValueError(
                f"message to {topic!r} is over the NATS server's max_payload limit "
                f"(headers included)"
            )
        if isinstance(exc, (errors.ConnectionClosedError, errors.OutboundBufferLimitError,
                            errors.ConnectionDrainingError, errors.StaleConnectionError)):
            return BrokerConnectionError(f"NATS connection unavailable: {type(exc).__name__}")
        return exc

    async def _send(self, nc: Client, subject: str, body: bytes,
                    headers: dict[str, str] | None, reply: str = "") -> None:
        """``nc.publish``, with headers encoded by :func:`encode_headers` (see above) and the
        command appended to the client's pending buffer directly (what ``_send_command``
        does), after the same checks."""
        if not self._fast:
            await nc.publish(subject, body, reply=reply, headers=headers)
            return
        if headers:
            header = encode_headers(headers)
            size = len(header) + len(body)
            command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), len(header), size, header, body)
        else:
            size = len(body)
            command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, body)
        if size > nc._max_payload or nc._status != self._connected_status:
            self._check_sendable(nc, size)
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if 0 < nc._max_pending_size < nc._pending_data_size:
            await nc._flush_pending(force_flush=True)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    def _check_sendable(self, nc: Client, size: int) -> None:
        """nats-py's publish checks, for when the message is large or the client not plainly
        connected (closed, draining, reconnecting: then buffered up to its pending size)."""
        errors = self._errors
        if size > nc.max_payload:
            raise errors.MaxPayloadError
        if nc.is_closed:
            raise errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise errors.ConnectionDrainingError
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
        ):
            raise errors.OutboundBufferLimitError

    async def _js_publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        nc = self._conn()
        window = self._window
        if window is not None and self._window_failures:
            failure = self._window_failures.popleft()
            raise BrokerConnectionError(
                f"an earlier JetStream publish was not acknowledged: {failure!r}"
            ) from failure
        root = topic.split(".", 1)[0]
        if root not in self._streams and topic not in self._streams:
            await self._stream_for(topic)
        msg_id = headers.get(self.header_prefix + "id")
        if msg_id is not None:
            headers[MSG_ID] = f"{msg_id}:{topic}"
        for retry in (True, False):
            prefix = self._ack_prefix or await self._init_acks()
            token = str(next(self._tokens))
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            if window is not None:
                await window.acquire()
                future.add_done_callback(self._window_done)
            self._acks[token] = future
            self._deadlines.add(self.publish_timeout, future,
                                functools.partial(self._ack_expired, token, topic))
            try:
                await self._send(nc, topic, body, headers, prefix + token)
            except Exception as exc:
                self._acks.pop(token, None)
                future.cancel()
                raise self._publish_error(exc, topic) from exc
            if window is not None:
                return
            try:
                await future
                return
            except NoResponders:
                if not retry:
                    raise BrokerConnectionError(
                        f"JetStream did not answer for {topic!r}: no stream captures it, "
                        "or JetStream is not available (yet)"
                    ) from None
                # The stream may be gone (deleted) or JetStream restarting: check, then retry.
                self._forget_stream(topic)
                await self._stream_for(topic)

    def _ack_expired(self, token: str, topic: str, future: asyncio.Future[int]) -> None:
        self._acks.pop(token, None)
        future.set_exception(TimeoutError(
            f"JetStream did not acknowledge a publish to {topic!r} within "
            f"{self.publish_timeout}s; it may or may not be stored (publishing the same "
            "message again is deduplicated)"
        ))

    def _window_done(self, future: asyncio.Future[int]) -> None:
        assert self._window is not None
        self._window.release()
        if not future.cancelled() and future.exception() is not None:
            self._window_failures.append(future.exception())  # type: ignore[arg-type]

    async def flush(self) -> None:
        """Wait until every JetStream publish so far is acknowledged (``max_pending_acks``
        mode); raise if one was not."""
        pending = [f for f in self._acks.values() if not f.done()]
        if pending:
            await asyncio.wait(pending)
        if self._window_failures:
            failures = list(self._window_failures)
            self._window_failures.clear()
            raise BrokerConnectionError(
                f"{len(failures)} JetStream publish(es) were not acknowledged; first: "
                f"{failures[0]!r}"
            ) from failures[0]

    async def _init_acks(self) -> str:
        async with self._ack_lock:
            if self._ack_prefix is None:
                from nats.nuid import NUID

                prefix = f"{self._ack_marker}{NUID().next().decode()}."
                await self._listen(prefix + "*", self._on_ack)
                self._ack_prefix = prefix
            return self._ack_prefix

    def _on_ack(self, subject: str, reply: str, headers: dict[str, str] | None,
                data: bytes) -> None:
        prefix = self._ack_prefix or ""
        future = self._acks.pop(subject[len(prefix):], None)
        if future is None or future.done():
            return
        if headers and headers.get(STATUS) == "503":
            future.set_exception(NoResponders("no JetStream stream answered"))
            return
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            future.set_exception(BrokerConnectionError(f"bad JetStream ack: {data[:100]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            description = error.get("description", error)
            future.set_exception(
                BrokerConnectionError(f"JetStream refused a publish: {description}")
            )
        else:
            future.set_result(int(answer.get("seq", 0)))

    # --- own subscriptions -------------------------------------------------------------------

    async def _listen(self, subject: str, route: Route, queue: str = "") -> Subscription:
        """Subscribe ``route`` to ``subject``: fed by :class:`FastParser` straight from the
        socket, or (``fast_path`` off) through a nats-py callback. nats-py keeps the
        subscription either way, so it restores it after a reconnect."""
        nc = self._conn()
        if self._fast:
            sub = await nc.subscribe(subject, queue=queue)
            self._routes[sub._id] = route
            return sub

        async def relay(msg: Msg) -> None:
            route(msg.subject, msg.reply, msg.headers, msg.data)

        return await nc.subscribe(subject, queue=queue, cb=relay, pending_msgs_limit=0,
                                  pending_bytes_limit=0)

    async def _unlisten(self, sub: Subscription) -> None:
        self._routes.pop(sub._id, None)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    # --- streams ---------------------------------------------------------------------------

    def _root_stream_name(self, root: str) -> str:
        if _STREAM_NAME_OK.fullmatch(root):
            return self.stream_prefix + root
        digest = hashlib.sha1(root.encode()).hexdigest()[:8]
        cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", root)[:40]
        return f"{self.stream_prefix}{cleaned}_{digest}"

    def _forget_stream(self, topic: str) -> None:
        self._streams.pop(topic.split(".", 1)[0], None)
        self._streams.pop(topic, None)

    async def _stream_for(self, pattern: str) -> str:
        """The stream that holds ``pattern``'s messages, created if need be."""
        root = pattern.split(".", 1)[0]
        name = self._streams.get(root) or self._streams.get(pattern)
        if name is not None:
            return name
        async with self._stream_lock:
            name = self._streams.get(root) or self._streams.get(pattern)
            if name is None:
                name = await self._ensure_stream(pattern, root)
            return name

    def _stream_config(self, name: str, subjects: list[str]) -> Any:
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig

        return StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if self.storage == "file" else StorageType.MEMORY,
            max_age=self.stream_max_age,
            duplicate_window=self.duplicate_window,
        )

    async def _ensure_stream(self, pattern: str, root: str) -> str:
        from nats import errors
        from nats.js.errors import APIError, NotFoundError

        js = self._conn().jetstream(timeout=self.publish_timeout)
        try:
            if self.stream is not None:
                try:
                    await js.stream_info(self.stream)
                except NotFoundError:
                    if not self.stream_subjects:
                        raise UnsupportedFeature(
                            f"stream {self.stream!r} does not exist; create it, or pass "
                            "stream_subjects so the adapter creates it"
                        ) from None
                    await js.add_stream(self._stream_config(self.stream, self.stream_subjects))
                self._streams[root] = self.stream
                return self.stream
            if "*" in root or ">" in root:
                raise UnsupportedFeature(
                    f"pattern {pattern!r}: JetStream groups and replay need a literal first "
                    "segment (one stream per first segment), or one stream for everything "
                    "(stream=..., stream_subjects=[...])"
                )
            name = self._root_stream_name(root)
            try:
                await js.add_stream(self._stream_config(name, [root, f"{root}.>"]))
            except APIError as exc:
                if exc.err_code == 10058:  # name in use with another config: reuse it
                    self._streams[root] = name
                    return name
                if exc.err_code != 10065:  # 10065: subjects overlap an existing stream
                    raise
                probe = pattern if not ("*" in pattern or ">" in pattern) else f"{root}.>"
                existing = await js.find_stream_name_by_subject(probe)
                logger.info("reusing the existing stream %s for %s", existing, pattern)
                self._streams[pattern] = existing
                return existing
            self._streams[root] = name
            return name
        except (errors.NoRespondersError, errors.TimeoutError, asyncio.TimeoutError,
                errors.ConnectionClosedError) as exc:
            raise BrokerConnectionError(
                f"JetStream is not available on this NATS server: {type(exc).__name__}"
            ) from None

    # --- subscribe -------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        nc = self._conn()
        if group is not None and self.use_jetstream:
            stream = await self._stream_for(pattern)
            consumer = await self._ensure_consumer(stream, pattern, group)
            pull = _PullSubscription(self, stream, consumer, handler, prefetch)
            await pull.start()
            return pull
        channel = _CoreChannel(self, pattern, handler)
        try:
            channel.sub = await self._listen(pattern, channel.push, queue=group or "")
            await flush_in_order(nc)  # the server has the subscription once its PONG is back
        except BaseException:
            await channel.close()
            raise
        return channel

    def _consumer_name(self, group: str, pattern: str) -> str:
        digest = hashlib.sha1(f"{group}\0{pattern}".encode()).hexdigest()[:12]
        cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", group)[:48]
        return f"{cleaned}_{digest}"

    async def _ensure_consumer(self, stream: str, pattern: str, group: str) -> str:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import APIError

        name = self._consumer_name(group, pattern)
        js = self._conn().jetstream(timeout=self.publish_timeout)
        config = ConsumerConfig(
            durable_name=name,
            description=f"amb-core group {group!r} on {pattern!r}",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=DeliverPolicy.NEW if self.group_start == "new" else DeliverPolicy.ALL,
            filter_subject=pattern,
            max_deliver=-1,  # the bus dead-letters after its RetryPolicy's last attempt
            max_ack_pending=self.max_ack_pending,
        )
        try:
            await js.add_consumer(stream, config)
        except APIError as exc:
            if exc.err_code not in (10013, 10148):  # already exists with another config
                raise
            info = await js.consumer_info(stream, name)
            logger.info(
                "group %r on %s: reusing durable consumer %s as configured on the server "
                "(ack_wait=%ss)", group, pattern, name, info.config.ack_wait,
            )
        return name

    # --- request / reply -------------------------------------------------------------------

    async def request(
        self, topic: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Delivery:
        nc = self._conn()
        prefix = self._response_prefix or await self._init_responses()
        token = str(next(self._tokens))
        inbox = prefix + token
        if self.use_jetstream:
            # A JetStream group member receives the stored request without NATS's reply
            # subject; the envelope carries it (the bus reads it back as reply_to).
            headers[self.header_prefix + "ambreplyto"] = inbox
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bytes, dict[str, str] | None]] = loop.create_future()
        self._responses[token] = future
        self._deadlines.add(timeout, future, functools.partial(_request_expired, topic, timeout))
        try:
            await self._send(nc, topic, body, headers, inbox)
            data, reply_headers = await future
        except NotConnected:
            raise
        except (RequestTimeout, NoResponders):
            raise
        except Exception as exc:
            raise self._publish_error(exc, topic) from exc
        finally:
            self._responses.pop(token, None)
        return Delivery(topic, data, _delivered_headers(reply_headers))

    async def _init_responses(self) -> str:
        async with self._response_lock:
            if self._response_prefix is None:
                from nats.nuid import NUID

                prefix = f"{self._inbox_prefix}.{NUID().next().decode()}."
                await self._listen(prefix + "*", self._on_response)
                self._response_prefix = prefix
            return self._response_prefix

    def _on_response(self, subject: str, reply: str, headers: dict[str, str] | None,
                     data: bytes) -> None:
        prefix = self._response_prefix or ""
        future = self._responses.get(subject[len(prefix):])
        if future is None or future.done():
            return  # late, or a duplicate: its request is gone
        if headers and headers.get(STATUS) == "503" and not data:
            topic = headers.get("Nats-Subject", "the topic")
            future.set_exception(NoResponders(f"no subscriber serves {topic}; request failed fast"))
            return
        if _is_pub_ack(data, headers):
            # A stream captures this subject (in either mode: streams are server-side), stored
            # the request and said so. Not the reply: keep waiting for the responder's.
            return
        future.set_result((data, headers))

    # --- replay ----------------------------------------------------------------------------

    async def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        if not self.use_jetstream:
            raise UnsupportedFeature("core NATS keeps no log; use use_jetstream=True to replay")
        from nats.js.api import ConsumerConfig, DeliverPolicy

        nc = self._conn()
        stream = await self._stream_for(topic)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if isinstance(since, datetime):
            moment = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                    opt_start_time=moment.astimezone(timezone.utc))
        elif since is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(int(since), 1))
        js = nc.jetstream(timeout=self.publish_timeout)
        sub = await js.subscribe(topic, stream=stream, ordered_consumer=True, config=config)
        try:
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            if info.num_pending == 0 and not delivered and sub.pending_msgs == 0:
                return
            while True:
                msg = await sub.next_msg(timeout=max(self.publish_timeout, 5.0))
                metadata = msg.metadata
                yield Delivery(msg.subject, msg.data, _delivered_headers(msg.headers),
                               position=metadata.sequence.stream,
                               delivery_count=metadata.num_delivered)
                if metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- group members: keep their messages alive, restart lost pulls ----------------------

    async def _keep_pulls(self) -> None:
        tick = min(self.ack_wait / 4, 1.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for sub in list(self._pull_subs):
                try:
                    await sub.keep_alive(now)
                except Exception:
                    logger.debug("in-progress acks failed", exc_info=True)


async def flush_in_order(nc: Client, timeout: float = 10.0) -> None:
    """A round trip that follows every command given so far (SUB, PUB, UNSUB).

    ``Client.flush()`` alone is not that: it writes its PING straight to the socket, while
    commands wait in the client's pending buffer for its flusher task, so the PING can go out
    first and its PONG proves nothing about them (a SUB not yet processed when ``subscribe()``
    returned, so another connection's publish right after it was not delivered). Hand the
    pending buffer to the socket first; the server answers a connection's commands in order.
    """
    flush_pending = getattr(nc, "_flush_pending", None)
    if flush_pending is not None and getattr(nc, "_pending_data_size", 1) > 0:
        await asyncio.wait_for(flush_pending(force_flush=True), timeout)
    await nc.flush(timeout=max(int(timeout), 1))


def _delivered_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """A delivery's headers as the bus gets them: ``Nats-Msg-Id`` is the adapter's own (dedup),
    so user headers round-trip unchanged."""
    if headers is None:
        return {}
    if MSG_ID in headers:
        del headers[MSG_ID]
    return headers


def _is_pub_ack(data: bytes, headers: dict[str, str] | None) -> bool:
    return data.startswith(b'{"stream"') and b'"seq"' in data and not (
        headers and any(key.startswith("ce-") for key in headers)
    )


def _request_expired(topic: str, timeout: float, future: asyncio.Future[Any]) -> None:
    future.set_exception(RequestTimeout(f"no reply from {topic!r} within {timeout}s"))


class _Deadlines:
    """Timeouts of many futures on one event-loop timer.

    ``loop.call_later`` per publish or request, then cancelling it, was a visible share of
    either: a TimerHandle, a push on the loop's heap and a cancel each time. Here a future and
    what to do if it is still pending at its deadline go on our own heap; one timer, for the
    earliest deadline, expires what is due. Settled futures are dropped as they surface, and
    in bulk every ``_PRUNE_EVERY`` additions, so the heap holds about what is pending.
    """

    _PRUNE_EVERY = 1024

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[Any],
                               Callable[[asyncio.Future[Any]], None]]] = []
        self._sequence = itertools.count()
        self._added = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, timeout: float, future: asyncio.Future[Any],
            expire: Callable[[asyncio.Future[Any]], None]) -> None:
        """``expire(future)`` runs at ``timeout`` seconds from now if ``future`` is not done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        heapq.heappush(self._heap, (deadline, next(self._sequence), future, expire))
        self._added += 1
        if self._added >= self._PRUNE_EVERY:
            self._added = 0
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
        if self._timer is None or deadline < self._timer_at:
            self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # the loop may run a timer a hair early: no spinning on it
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, future, expire = heapq.heappop(heap)
            if not future.done():
                expire(future)
        self._schedule(loop)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def __len__(self) -> int:
        """Futures still pending (for tests)."""
        return sum(1 for entry in self._heap if not entry[2].done())


class _CoreChannel(BrokerSubscription):
    """A core subscription: its messages wait here and one task hands them to the bus in order.

    Bounded by the broker's ``pending_msgs_limit``/``pending_bytes_limit`` as nats-py bounds
    its own queues: beyond them messages are dropped (core NATS is at-most-once) and a warning
    is logged once, rather than memory growing without end behind a slow handler.
    """

    def __init__(self, broker: NATSBroker, pattern: str, handler: DeliveryHandler) -> None:
        self.sub: Subscription | None = None
        self._broker = broker
        self._pattern = pattern
        self._handler = handler
        self._marker = broker._ack_marker
        self._queue: deque[tuple[str, str, dict[str, str] | None, bytes]] = deque()
        self._bytes = 0
        self._max_msgs = broker.pending_msgs_limit
        self._max_bytes = broker.pending_bytes_limit
        self._warned = False
        self._loop = asyncio.get_running_loop()
        self._wakeup: asyncio.Future[None] | None = None
        self._task = self._loop.create_task(self._run())

    def push(self, subject: str, reply: str, headers: dict[str, str] | None,
             data: bytes) -> None:
        queue = self._queue
        if len(queue) >= self._max_msgs > 0 or self._bytes >= self._max_bytes > 0:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "NATS slow consumer on %s: messages dropped (core subscriptions are "
                    "at-most-once; raise pending_msgs_limit or max_concurrency)", self._pattern,
                )
            return
        queue.append((subject, reply, headers, data))
        self._bytes += len(data)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    async def _run(self) -> None:
        queue, handler, marker = self._queue, self._handler, self._marker
        while True:
            if not queue:
                self._wakeup = self._loop.create_future()
                await self._wakeup
                continue
            subject, reply, headers, data = queue.popleft()
            self._bytes -= len(data)
            try:
                await handler(Delivery(
                    subject, data, _delivered_headers(headers),
                    reply_to=reply if reply and not reply.startswith(marker) else None,
                ))
            except Exception:
                logger.exception("delivering a NATS message from %s failed", subject)

    async def close(self) -> None:
        if self.sub is not None:
            await self._broker._unlisten(self.sub)
            self.sub = None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._queue.clear()


class _JetStreamDelivery(Delivery):
    __slots__ = ("_ack_subject", "_owner")

    def __init__(self, owner: _PullSubscription, subject: str, ack_subject: str, data: bytes,
                 headers: dict[str, str], delivered: int, sequence: int) -> None:
        super().__init__(subject, data, headers, delivery_count=delivered, position=sequence)
        self._owner = owner
        self._ack_subject = ack_subject

    async def ack(self) -> None:
        await self._owner.settle(self._ack_subject, _ACK)

    async def retry_later(self, delay: float) -> bool:
        payload = _NAK + b' {"delay": %d}' % int(delay * 1e9) if delay > 0 else _NAK
        await self._owner.settle(self._ack_subject, payload)
        return True

    async def term(self) -> None:
        """Tell JetStream never to redeliver this message (not used by the bus)."""
        await self._owner.settle(self._ack_subject, b"+TERM")


class _PullSubscription(BrokerSubscription):
    """One group member: pulls from a durable consumer into a bounded buffer (at most one batch
    buffered or requested) and hands messages to the bus one by one; more is requested whenever
    half a batch is free."""

    def __init__(self, broker: NATSBroker, stream: str, consumer: str,
                 handler: DeliveryHandler, prefetch: int) -> None:
        self._broker = broker
        self._stream = stream
        self._consumer = consumer
        self._handler = handler
        self._batch = max(broker.pull_batch, prefetch)
        self._low_water = self._batch // 2
        self._buffer: deque[tuple[str, str, dict[str, str] | None, bytes]] = deque()
        self._held: dict[str, float] = {}
        """ack subject -> when it was last touched, for every message not yet settled"""
        self._wake = asyncio.Event()
        self._outstanding = 0
        self._last_activity = 0.0
        self._sub: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_subject = f"{_JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._expires_ns = int(broker.pull_expires * 1e9)
        self._inbox = ""
        self._closed = False
        self._gone = False

    async def start(self) -> None:
        self._inbox = self._broker._conn().new_inbox()
        self._sub = await self._broker._listen(self._inbox, self._on_msg)
        self._broker._pull_subs.add(self)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._pull()  # a message published after subscribe returns is ours to get

    def _on_msg(self, subject: str, reply: str, headers: dict[str, str] | None,
                data: bytes) -> None:
        if self._closed:
            return
        self._last_activity = time.monotonic()
        if reply:
            if self._outstanding > 0:
                self._outstanding -= 1
            self._held[reply] = self._last_activity
            self._buffer.append((subject, reply, headers, data))
            self._wake.set()
            return
        status = headers.get(STATUS) if headers else None
        if status == "100":
            return  # heartbeat
        headers = headers or {}
        if status == "409" and "Deleted" in headers.get(DESCRIPTION, "") and not self._gone:
            self._gone = True  # each of our open pull requests says so: log it once
            logger.warning("consumer %s on %s was deleted", self._consumer, self._stream)
        # 408/409: one pull request is over, and the server says how much of it went unused.
        unused = headers.get(PENDING_MESSAGES, "")
        if unused.isdigit():
            self._outstanding = max(self._outstanding - int(unused), 0)
        else:
            self._outstanding = 0
        self._wake.set()

    def restart_pull(self) -> None:
        """After a reconnect the server forgot our waiting pull request."""
        self._outstanding = 0
        self._wake.set()

    async def _pull(self) -> None:
        """Ask for what tops buffered + requested up to one batch. Pulls overlap: the next one
        goes out while the last is still being filled, so messages keep flowing."""
        want = self._batch - len(self._buffer) - self._outstanding
        if want <= 0:
            return
        self._outstanding += want
        self._last_activity = time.monotonic()
        payload = b'{"batch":%d,"expires":%d}' % (want, self._expires_ns)
        broker = self._broker
        try:
            await broker._send(broker._conn(), self._next_subject, payload, None, self._inbox)
        except Exception:
            self._outstanding = max(self._outstanding - want, 0)
            raise

    async def _read(self) -> None:
        buffer = self._buffer
        handler = self._handler
        while True:
            if self._outstanding + len(buffer) <= self._low_water:
                try:
                    await self._pull()
                except NotConnected:
                    return
                except Exception:
                    logger.debug("pull request failed; retrying", exc_info=True)
                    await asyncio.sleep(min(self._broker.reconnect_time_wait, 1.0))
                    continue
            if not buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            subject, reply, headers, data = buffer.popleft()
            tokens = reply.split(".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or the
            # longer form with domain and account hash (tokens counted from the end).
            delivered, sequence = int(tokens[-5]), int(tokens[-4])
            await handler(_JetStreamDelivery(self, subject, reply, data,
                                             _delivered_headers(headers), delivered, sequence))

    async def settle(self, ack_subject: str, payload: bytes) -> None:
        if self._held.pop(ack_subject, None) is None and self._closed:
            return  # already nak'ed at close
        await self._broker._send(self._broker._conn(), ack_subject, payload, None)

    async def keep_alive(self, now: float) -> None:
        """In-progress acks for messages held past half of ack_wait; restart a lost pull."""
        if self._closed:
            return
        half = self._broker.ack_wait / 2
        nc = self._broker._conn()
        for subject, touched in list(self._held.items()):
            if now - touched >= half and subject in self._held:
                self._held[subject] = now
                await self._broker._send(nc, subject, _PROGRESS, None)
        if self._outstanding and now - self._last_activity > self._broker.pull_expires + 5:
            self.restart_pull()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._broker._pull_subs.discard(self)
        if self._sub is not None:
            await self._broker._unlisten(self._sub)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        # Whatever we held and did not settle goes back at once, for another member.
        held, self._held = list(self._held), {}
        self._buffer.clear()
        nc = self._broker._nc
        if nc is not None and not nc.is_closed:
            for subject in held:
                with contextlib.suppress(Exception):
                    await nc.publish(subject, _NAK)
            with contextlib.suppress(Exception):
                await flush_in_order(nc)

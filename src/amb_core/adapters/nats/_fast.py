"""The fast path: every use of nats-py's private attributes, in this one module.

On the adapter's own connection it replaces nats-py's protocol parser (:class:`FastParser`, in
``Client._ps``) and header parser (``Client._parse_header_lines``), and appends ``PUB``/``HPUB``
commands to the client's pending buffer directly (:class:`FastSender`), after the checks
nats-py's ``publish`` makes. It is switched on only for the nats-py versions in
:data:`TESTED` (``major.minor``) that also have every attribute in :data:`ATTRIBUTES`; any
other version gets nats-py's public API, and the connect log line says which and why.
``tests/test_nats_wire.py`` checks the parser against nats-py's own on random protocol streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from amb_core.adapters.nats.headers import encode_headers, parse_header_block, parse_header_lines

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)

TESTED = frozenset({"2.16"})
"""nats-py versions (``major.minor``) the fast path was tested on (the contract suite in both
modes, tests/test_nats_wire.py). Add one only after running them on it."""

ATTRIBUTES = (
    "_flush_pending", "_flush_queue", "_max_pending_size", "_pending_data_size", "_pending",
    "_parse_header_lines", "_max_payload", "_ps", "_process_msg", "_status", "CONNECTED",
)
"""The nats-py internals used here. (nats-py's ``stats`` counters do not count what goes
through the fast path.)"""

Route = Callable[[str, str, "dict[str, str] | None", bytes], None]
"""What receives one message of an own subscription: (subject, reply, headers, data). Called
synchronously by the parser; it must not raise and must not block."""


def client_version() -> str:
    try:
        return version("nats-py")
    except PackageNotFoundError:
        return "unknown"


def why_not(nc: Client, installed: str | None = None) -> str | None:
    """None if the fast path can run on ``nc``, else the reason it cannot."""
    installed = client_version() if installed is None else installed
    if ".".join(installed.split(".")[:2]) not in TESTED:
        return (f"nats-py {installed} is not a version the fast path was tested on "
                f"({', '.join(sorted(TESTED))})")
    missing = [name for name in ATTRIBUTES if not hasattr(nc, name)]
    if missing:
        return f"nats-py {installed} lacks {', '.join(missing)}"
    return None


def install(nc: Client, routes: dict[int, Route]) -> None:
    """This connection only: nats-py calls both through the instance."""
    nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]
    nc._ps = FastParser(nc, routes, nc._ps)  # type: ignore[assignment]


def sid(sub: Subscription) -> int:
    """The subscription's id on the wire (what MSG lines name)."""
    return sub._id


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
    from nats.errors import ProtocolError

    return ProtocolError(text)


class FastSender:
    """``nc.publish``, with headers encoded by :func:`encode_headers` and the command appended
    to the client's pending buffer directly (what ``Client._send_command`` does), after the
    same checks."""

    __slots__ = ("_connected", "nc")

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._connected = type(nc).CONNECTED

    async def send(self, subject: str, body: bytes, headers: dict[str, str] | None,
                   reply: str = "", extra: tuple[str, str] | None = None) -> None:
        nc = self.nc
        if headers or extra is not None:
            header = encode_headers(headers or {}, extra)
            size = len(header) + len(body)
            command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), len(header), size, header, body)
        else:
            size = len(body)
            command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, body)
        if size > nc._max_payload or nc._status != self._connected:
            _check_sendable(nc, size)
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if 0 < nc._max_pending_size < nc._pending_data_size:
            await nc._flush_pending(force_flush=True)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


def _check_sendable(nc: Client, size: int) -> None:
    """nats-py's publish checks, for when the message is large or the client not plainly
    connected (closed, draining, reconnecting: then buffered up to its pending size)."""
    from nats import errors

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


async def hand_pending_to_socket(nc: Client, timeout: float) -> None:
    """Write the client's pending buffer to the socket now (nats-py's flusher would, soon)."""
    import asyncio

    flush_pending = getattr(nc, "_flush_pending", None)
    if flush_pending is not None and getattr(nc, "_pending_data_size", 1) > 0:
        await asyncio.wait_for(flush_pending(force_flush=True), timeout)

"""NATSBroker: the mapping of amb onto NATS (core subjects, queue groups, request/reply) and
the connection; JetStream's part is in ``jetstream.py``, nats-py's internals in ``_fast.py``.

Topics are subjects, one to one; ``*`` and ``>`` are NATS's own wildcards. The envelope travels as
NATS headers with the ``ce-`` prefix (CloudEvents NATS binding, binary mode).

Core mode (``use_jetstream=False``, the default):

- plain subscribe = a core subscription; consumer group = a NATS queue group named by the group.
  Both are at-most-once: a message is delivered to whoever is subscribed when it is published;
  nothing is stored, nothing is redelivered, a crashed member's message is lost.
- publish buffers the message in the client and returns (nats-py flushes in the background).

JetStream mode (``use_jetstream=True``): see :mod:`amb_core.adapters.nats.jetstream`.

Request/reply is NATS's own (a reply inbox per connection); a request nobody serves fails fast
with :class:`~amb_core.errors.NoResponders`. See docs/nats.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import itertools
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from amb_core.adapters._client import require
from amb_core.adapters.nats import _fast
from amb_core.adapters.nats.headers import REPLY_TO, STATUS, delivered_headers
from amb_core.broker import (
    Broker,
    BrokerSubscription,
    Capabilities,
    Delivery,
    DeliveryHandler,
    mask_url,
)
from amb_core.errors import BrokerConnectionError, NoResponders, NotConnected
from amb_core.runtime import ErrorMap, OnDemand, PendingReplies, Pump, ReconnectPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import datetime

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from amb_core.adapters.nats.jetstream import JetStream

logger = logging.getLogger(__name__)

_STREAM_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
HEADER_ALLOWANCE = 4096
"""Bytes of a message's size kept for headers: NATS counts headers in ``max_payload``."""

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

Route = _fast.Route
Sender = Callable[..., Awaitable[None]]
"""``send(subject, body, headers, reply="", extra=None)``: one PUB/HPUB on the connection."""


class PayloadOverLimit(ValueError):
    """A message over the NATS server's ``max_payload`` (headers count too)."""

    def __init__(self, text: str) -> None:
        super().__init__(f"{text} (over the server's max_payload limit, headers included)")


def _client_errors() -> list[tuple[Any, type[BaseException]]]:
    from nats import errors

    return [
        (errors.MaxPayloadError, PayloadOverLimit),
        ((errors.ConnectionClosedError, errors.OutboundBufferLimitError,
          errors.ConnectionDrainingError, errors.StaleConnectionError, errors.NoServersError,
          errors.NoRespondersError, errors.TimeoutError, asyncio.TimeoutError, OSError),
         BrokerConnectionError),
    ]


def _refused(exc: BaseException) -> bool:
    """Nothing listens at the address (one address, or every address of a name)."""
    return isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and f"[Errno {errno.ECONNREFUSED}]" in str(exc)
    )


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


async def flush_in_order(nc: Client, timeout: float = 10.0) -> None:
    """A round trip that follows every command given so far (SUB, PUB, UNSUB).

    ``Client.flush()`` alone is not that: it writes its PING straight to the socket, while
    commands wait in the client's pending buffer for its flusher task, so the PING can go out
    first and its PONG proves nothing about them (a SUB not yet processed when ``subscribe()``
    returned, so another connection's publish right after it was not delivered). Hand the
    pending buffer to the socket first; the server answers a connection's commands in order.
    """
    await _fast.hand_pending_to_socket(nc, timeout)
    await nc.flush(timeout=max(int(timeout), 1))


class PublicSender:
    """``send`` through nats-py's public ``publish`` (the fallback of :class:`_fast.FastSender`)."""

    __slots__ = ("nc",)

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def send(self, subject: str, body: bytes, headers: dict[str, str] | None,
                   reply: str = "", extra: tuple[str, str] | None = None) -> None:
        if extra is not None:
            headers = {**(headers or {}), extra[0]: extra[1]}  # a copy: the caller's stay
        await self.nc.publish(subject, body, reply=reply, headers=headers)


async def _not_connected(*args: Any, **kwargs: Any) -> None:
    raise NotConnected("NATSBroker is not connected")


class NATSBroker(Broker):
    """NATS, core or JetStream.

    >>> NATSBroker(servers=["nats://localhost:4222"], use_jetstream=True)   # persistence
    >>> NATSBroker.from_url("nats://localhost:4222?jetstream=true&ack_wait=60")

    Credentials and TLS pass through to ``nats.connect`` (``user``/``password``, ``token``,
    ``user_credentials`` (a .creds file), ``nkeys_seed`` (a seed file), ``tls`` (an
    ``ssl.SSLContext``), ``tls_hostname``) and never appear in ``repr`` or log lines; other
    ``nats.connect`` keyword arguments go through ``**options``.

    Reconnects: ``reconnect`` (a :class:`~amb_core.runtime.ReconnectPolicy`), mapped onto
    nats-py's own reconnect (nats-py reconnects by itself and restores core subscriptions).
    ``connect_timeout`` and ``reconnect_time_wait`` are kept as aliases: the first sets the
    policy's ``connect_timeout``, the second a fixed wait between attempts (initial and
    maximum delay both).

    JetStream options: ``stream``/``stream_subjects`` (one stream for everything instead of one
    per first topic segment), ``stream_prefix``, ``storage`` (``"file"`` or ``"memory"``),
    ``stream_max_age`` (seconds, None keeps messages until other limits), ``duplicate_window``
    (seconds), ``ack_wait`` (seconds before an unacked message is redelivered),
    ``max_ack_pending`` (per group), ``group_start`` (``"new"``: a new group gets messages
    published from its creation on; ``"all"``: everything the stream holds; a group on a
    kept dead-letter topic always starts at the oldest letter), ``pull_batch`` (messages a
    group member fetches ahead of its handlers), ``publish_timeout`` (seconds to wait for the
    stream's ack), ``max_pending_acks``, ``replicas`` (copies of each stream the adapter
    creates, and so of its durable consumers; None: 3 when the client knows of three or more
    servers of a cluster, else 1, see :meth:`JetStream.replicas`), ``leader_wait`` (on a
    cluster: seconds a publish keeps resending while its stream has no leader, e.g. during the
    election after the leader's server died; 15 by default, NATS 2.9 elects in about 5-10).

    Several servers (``servers=[...]`` or ``nats://a:4222,b:4222``): nats-py connects to one
    of them, learns the rest of the cluster from the server, and reconnects to another when
    its server is lost.
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
        reconnect: ReconnectPolicy | None = None,
        connect_timeout: float | None = None,
        reconnect_time_wait: float | None = None,
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
        leader_wait: float = 15.0,
        max_pending_acks: int = 0,
        replicas: int | None = None,
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
        if ack_wait <= 0 or publish_timeout <= 0 or pull_expires <= 0 or leader_wait <= 0:
            raise ValueError("ack_wait, publish_timeout, pull_expires, leader_wait must be > 0")
        if pull_batch < 1 or max_pending_acks < 0 or max_payload <= HEADER_ALLOWANCE:
            raise ValueError("pull_batch >= 1, max_pending_acks >= 0, max_payload > 4096")
        if replicas is not None and not 1 <= replicas <= 5:
            raise ValueError("replicas must be between 1 and 5 (JetStream's limit), or None")
        if stream is not None and not _STREAM_NAME_OK.fullmatch(stream):
            raise ValueError(f"stream name {stream!r}: use letters, digits, '_' and '-'")
        policy = reconnect or ReconnectPolicy()
        if connect_timeout is not None:
            policy = replace(policy, connect_timeout=connect_timeout)
        if reconnect_time_wait is not None:
            policy = replace(policy, initial_delay=reconnect_time_wait,
                             max_delay=reconnect_time_wait)
        self.reconnect = policy
        self.name = name
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
        self.leader_wait = leader_wait
        self.max_pending_acks = max_pending_acks
        self.replicas = replicas
        # Secrets live only here and go only to nats.connect.
        self._auth: dict[str, Any] = {
            key: value for key, value in {
                "user": user, "password": password, "token": token,
                "user_credentials": user_credentials, "nkeys_seed": nkeys_seed,
                "tls": tls, "tls_hostname": tls_hostname,
            }.items() if value is not None
        }
        taken = sorted(set(options) & {"max_reconnect_attempts", "reconnect_to_server_handler",
                                       "allow_reconnect", "error_cb", "disconnected_cb",
                                       "reconnected_cb"})
        if taken:
            raise ValueError(f"{', '.join(taken)}: the adapter sets these; pass "
                             "reconnect=ReconnectPolicy(...) for the reconnect options")
        self._options = options
        self._inbox_prefix = str(options.get("inbox_prefix", "_INBOX"))
        base = JETSTREAM_CAPABILITIES if use_jetstream else CORE_CAPABILITIES
        # Per instance: the mode and the server's payload limit decide them.
        self.capabilities = replace(base, max_payload=max_payload - HEADER_ALLOWANCE)

        self.fast_path = fast_path
        self._fast = False
        self._routes: dict[int, Route] = {}
        """sid -> receiver, for the subscriptions that FastParser hands messages to directly"""
        self._errors = ErrorMap("NATS", _client_errors)
        self._nc: Client | None = None
        self._send: Sender = _not_connected
        """one PUB/HPUB: the fast path's or nats-py's publish, chosen at connect"""
        self._ack_marker = f"{self._inbox_prefix}.amback."
        self._tokens = itertools.count(1)
        self._replies: PendingReplies[str, tuple[bytes, dict[str, str] | None]] = \
            PendingReplies()
        self._responses: OnDemand[str] = OnDemand(self._init_responses)
        """the response inbox's prefix, subscribed on the first request"""
        self._backoff = self.reconnect.backoff()
        self._connecting: asyncio.Future[str] | None = None
        self._refusals = 0
        self._closing: asyncio.Task[None] | None = None
        self._js: JetStream | None = None
        if use_jetstream:
            from amb_core.adapters.nats.jetstream import JetStream

            self._js = JetStream(self)

    @property
    def connect_timeout(self) -> float:
        return self.reconnect.connect_timeout

    def __repr__(self) -> str:
        servers = [mask_url(s) for s in self.servers]
        mode = "JetStream" if self.use_jetstream else "core"
        return f"NATSBroker(servers={servers!r}, use_jetstream={self.use_jetstream}) [{mode}]"

    @classmethod
    def from_url(cls, url: str) -> NATSBroker:
        """``nats://[user:password@]host:4222[,host2:4222][?jetstream=true&ack_wait=30&...]``.

        Query parameters: ``jetstream``, ``stream``, ``stream_prefix``, ``storage``,
        ``stream_max_age``, ``ack_wait``, ``max_ack_pending``, ``group_start``, ``pull_batch``,
        ``publish_timeout``, ``leader_wait``, ``max_pending_acks``, ``replicas``,
        ``connect_timeout``,
        ``reconnect_time_wait``,
        ``name``, ``creds`` (a .creds file), ``nkey`` (a seed file), ``token``. Credentials in
        the URL's user part pass to nats-py as they are.
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
                  "leader_wait", "duplicate_window", "pull_expires", "reconnect_time_wait")
        ints = ("max_ack_pending", "pull_batch", "max_pending_acks", "max_payload", "replicas")
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

    def _servers_text(self) -> str:
        return ", ".join(mask_url(s) for s in self.servers)

    async def connect(self) -> None:
        """Connect within the policy's ``connect_timeout``. Fails at once when every server
        refuses the connection (nothing listens) or refuses our credentials; a server that
        takes the connection and never answers times out."""
        if self._nc is not None and not self._nc.is_closed:
            return
        require("nats", "nats")
        from nats.aio.client import Client as NatsClient

        nc = NatsClient()
        problem = _fast.why_not(nc) if self.fast_path else "fast_path=False"
        self._fast = problem is None
        self._routes = {}
        if self._fast:
            _fast.install(nc, self._routes)
            logger.debug("NATS fast path on (nats-py %s)", _fast.client_version())
        else:
            (logger.debug if not self.fast_path else logger.info)(
                "NATS fast path off: %s; using nats-py's public API", problem)
        policy = self.reconnect
        reconnect: dict[str, Any] = {
            "max_reconnect_attempts": -1 if policy.max_attempts is None else policy.max_attempts,
            "reconnect_time_wait": policy.initial_delay,
        }
        if "reconnect_to_server_handler" in inspect.signature(nc.connect).parameters:
            reconnect["reconnect_to_server_handler"] = self._next_server
        else:  # an older nats-py: its fixed wait, as long as the policy's longest
            reconnect["reconnect_time_wait"] = policy.max_delay
        loop = asyncio.get_running_loop()
        self._connecting = failure = loop.create_future()
        self._refusals = 0
        attempt = loop.create_task(nc.connect(
            servers=self.servers,
            name=self.name,
            connect_timeout=policy.connect_timeout,  # type: ignore[arg-type]
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **reconnect,
            **self._auth,
            **self._options,
        ))
        try:
            await asyncio.wait({attempt, failure}, timeout=policy.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._connecting = None
        if not attempt.done() or attempt.cancelled() or attempt.exception() is not None:
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await nc.close()
            if failure.done():
                reason = failure.result()
            elif attempt.done() and not attempt.cancelled() and attempt.exception() is not None:
                reason = repr(attempt.exception())
            else:
                reason = (f"timed out after {policy.connect_timeout}s (no NATS server "
                          "answered)")
            raise BrokerConnectionError(
                f"could not connect to NATS at {self._servers_text()}: {reason}"
            ) from None
        failure.cancel()
        if nc.max_payload < self.max_payload:
            logger.warning(
                "NATS server max_payload is %d bytes, below the %d this broker was configured "
                "with; pass max_payload=%d", nc.max_payload, self.max_payload, nc.max_payload,
            )
        self._nc = nc
        self._send = (_fast.FastSender(nc) if self._fast else PublicSender(nc)).send
        self._backoff.reset()
        if self._js is not None:
            self._js.start()

    def _next_server(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        """nats-py's ``reconnect_to_server_handler``: the least-tried server, after the
        policy's next backoff delay (capped, with jitter)."""
        server = min(servers, key=lambda s: s.reconnects) if servers else None
        return server, self._backoff.next_delay()

    async def close(self) -> None:
        """Safe to call concurrently and twice: every caller waits for the one closing."""
        task = self._closing
        if task is None:
            if self._nc is None:
                return
            task = self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(task)

    async def _close(self) -> None:
        nc = self._nc
        try:
            if nc is None:
                return
            if self._js is not None:
                await self._js.close()
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=max(int(self.publish_timeout), 1))
                with contextlib.suppress(Exception):
                    await nc.close()
            self._replies.fail_all(NotConnected("the NATS connection was closed"))
            self._responses.reset()
            self._send = _not_connected
            self._nc = None
        finally:
            self._closing = None

    async def _on_error(self, exc: Exception) -> None:
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            if _refused(exc):
                self._refusals += 1  # consecutive: one refusal per server in the pool
                if self._refusals >= len(self.servers):
                    connecting.set_result(
                        "connection refused (nothing listens there)" if len(self.servers) == 1
                        else "every server refused the connection (nothing listens there)"
                    )
            elif "authorization violation" in str(exc).lower():
                connecting.set_result("authorization violation (check the credentials)")
            else:
                self._refusals = 0
            return
        logger.debug("NATS client error: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._closing is None and self._nc is not None:
            logger.warning("lost the connection to NATS at %s; reconnecting",
                           self._servers_text())

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s after %d attempt(s)", self._servers_text(),
                    max(self._backoff.attempts, 1))
        self._backoff.reset()
        if self._js is not None:
            self._js.restart_pulls()

    # --- publish ---------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Core: buffered, returns at once. JetStream: returns once the stream stored it."""
        if self._js is not None:
            await self._js.publish(topic, body, headers)
            return
        try:
            await self._send(topic, body, headers)
        except Exception as exc:
            mapped = self._errors.translate(exc, f"publish to {topic!r}")
            if mapped is exc:
                raise
            raise mapped from exc

    async def send_reply(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        """Replies go to the requester's inbox over core NATS, in both modes."""
        try:
            await self._send(reply_to, body, headers)
        except Exception as exc:
            mapped = self._errors.translate(exc, f"reply to {reply_to!r}")
            if mapped is exc:
                raise
            raise mapped from exc

    # --- own subscriptions -------------------------------------------------------------------

    async def _listen(self, subject: str, route: Route, queue: str = "") -> Subscription:
        """Subscribe ``route`` to ``subject``: fed by the fast path's parser straight from the
        socket, or (fast path off) through a nats-py callback. nats-py keeps the subscription
        either way, so it restores it after a reconnect."""
        nc = self._conn()
        if self._fast:
            sub = await nc.subscribe(subject, queue=queue)
            self._routes[_fast.sid(sub)] = route
            return sub

        async def relay(msg: Msg) -> None:
            route(msg.subject, msg.reply, msg.headers, msg.data)

        return await nc.subscribe(subject, queue=queue, cb=relay, pending_msgs_limit=0,
                                  pending_bytes_limit=0)

    async def _unlisten(self, sub: Subscription) -> None:
        if self._fast:
            self._routes.pop(_fast.sid(sub), None)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

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
        if group is not None and self._js is not None:
            return await self._js.subscribe_group(pattern, group, handler, prefetch)
        channel = CoreSubscription(self, pattern, handler)
        try:
            channel.sub = await self._listen(pattern, channel.push, queue=group or "")
            await flush_in_order(nc)  # the server has the subscription once its PONG is back
        except BaseException:
            await channel.close()
            raise
        return channel

    # --- request / reply -------------------------------------------------------------------

    async def request(
        self, topic: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Delivery:
        self._conn()
        prefix = self._responses.value or await self._responses.get()
        token = str(next(self._tokens))
        inbox = prefix + token
        future = self._replies.expect(token, timeout, repr(topic))
        try:
            # A JetStream group member receives the stored request without NATS's reply
            # subject; the adapter's own header carries it (written after the caller's
            # headers, which stay as they are).
            await self._send(topic, body, headers, inbox,
                             (REPLY_TO, inbox) if self._js is not None else None)
            data, reply_headers = await future
        except Exception as exc:
            mapped = self._errors.translate(exc, f"request to {topic!r}")
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            self._replies.discard(token)
        if reply_headers and not data and reply_headers.get(STATUS) == "503":
            raise NoResponders(f"no responders for {topic!r}: nobody serves it, so the request "
                               "failed at once")
        return Delivery(topic, data, delivered_headers(reply_headers))

    async def _init_responses(self) -> str:
        from nats.nuid import NUID

        prefix = f"{self._inbox_prefix}.{NUID().next().decode()}."
        await self._listen(prefix + "*", self._on_response)
        return prefix

    def _on_response(self, subject: str, reply: str, headers: dict[str, str] | None,
                     data: bytes) -> None:
        prefix = self._responses.value or ""
        if _is_pub_ack(data, headers):
            # A stream captures this subject (in either mode: streams are server-side), stored
            # the request and said so. Not the reply: keep waiting for the responder's.
            return
        self._replies.resolve(subject[len(prefix):], (data, headers))

    # --- JetStream's part ----------------------------------------------------------------------

    def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        if self._js is None:
            return super().replay(topic, since)
        return self._js.replay(topic, since)

    async def keep_dead_letters(self, topic: str) -> None:
        """JetStream: the topic's stream exists from now on (so every letter is stored), and a
        group created on it later starts at the oldest letter. Core NATS keeps nothing."""
        if self._js is not None:
            await self._js.keep_dead_letters(topic)

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        if self._js is None:
            return await super().remove_dead_letters(topic, positions)
        return await self._js.remove_messages(topic, positions)

    async def delete_group(self, pattern: str, group: str) -> None:
        if self._js is None:
            from amb_core.errors import UnsupportedFeature

            raise UnsupportedFeature(
                "core NATS queue groups keep no state on the server (a group exists while "
                "its members are subscribed): nothing to delete"
            )
        await self._js.delete_group(pattern, group)

    async def flush(self) -> None:
        """Wait until every JetStream publish so far is acknowledged (``max_pending_acks``
        mode); raise if one was not. Core mode: nothing to wait for."""
        if self._js is not None:
            await self._js.flush()


def _is_pub_ack(data: bytes, headers: dict[str, str] | None) -> bool:
    return data.startswith(b'{"stream"') and b'"seq"' in data and not (
        headers and any(key.startswith("ce-") for key in headers)
    )


class CoreSubscription(BrokerSubscription):
    """A core subscription: the parser offers its messages to a :class:`Pump` (bounded by
    ``pending_msgs_limit``/``pending_bytes_limit`` as nats-py bounds its own queues), whose
    task hands them to the bus in order. Beyond the bounds messages are dropped (core NATS is
    at-most-once) and the pump's one slow-consumer report says so."""

    __slots__ = ("_broker", "_marker", "_offer", "_pump", "sub")

    def __init__(self, broker: NATSBroker, pattern: str, handler: DeliveryHandler) -> None:
        self.sub: Subscription | None = None
        self._broker = broker
        self._marker = broker._ack_marker
        limit = broker.pending_msgs_limit
        self._pump: Pump[Delivery] = Pump(
            handler,
            max_items=limit if limit > 0 else sys.maxsize,
            max_bytes=max(broker.pending_bytes_limit, 0),
            name=f"NATS subscription {pattern!r}",
            hint="raise pending_msgs_limit or max_concurrency",
        )
        self._offer = self._pump.offer

    def push(self, subject: str, reply: str, headers: dict[str, str] | None,
             data: bytes) -> None:
        self._offer(Delivery(
            subject, data, delivered_headers(headers),
            reply_to=reply if reply and not reply.startswith(self._marker) else None,
        ), len(data))

    async def close(self) -> None:
        if self.sub is not None:
            await self._broker._unlisten(self.sub)
            self.sub = None
        await self._pump.close()


__all__ = ["CoreSubscription", "NATSBroker", "flush_in_order"]

"""An in-memory Service Bus namespace standing exactly where azure-servicebus 7.15's objects stand.

Tests only: the adapter reaches it through ``client_factory=`` / ``admin_factory=``; nothing in
``src/`` imports it. It implements the subset of the SDK the adapter uses, with the SDK's own
message class on send and the SDK's own exception types, and it is strict where the service or
the SDK is:

- settling a message twice raises ``MessageAlreadySettled``; settling after its lock expired
  raises ``MessageLockLostError`` (the expired message is back in the subscription, its delivery
  count one higher); settling through another receiver, a closed receiver or a peeked message
  raises ``ValueError``;
- receiving from (or opening a receiver on) a subscription or topic that does not exist raises
  ``MessagingEntityNotFoundError``; a receiver whose subscription is deleted fails its next
  receive the same way;
- a message over the namespace's size (body and properties) raises ``MessageSizeExceededError``;
- the administration client refuses names over 50 characters or with characters the service
  refuses, lock durations over 5 minutes, idle deletion under 5 minutes, unknown keyword
  arguments, existing entities (``ResourceExistsError``) and missing ones
  (``ResourceNotFoundError``);
- a SQL filter outside the subset it parses, or one the service would reject (an unterminated
  string, an escape character not followed by ``%``, ``_`` or itself, a multi-character
  ``ESCAPE``), raises ``HttpResponseError`` (400) at ``create_rule``.

It evaluates the rules it accepts on every send: correlation filters on application
properties, ``TrueRuleFilter``, and SQL with ``=``, ``<>``, ``LIKE`` / ``NOT LIKE`` (with
``ESCAPE``), ``AND``, ``OR``, ``NOT`` and parentheses, so routing is really tested. Received
messages carry ``application_properties`` with bytes keys and bytes string values, and a
0-based ``delivery_count`` (the AMQP header's count of earlier deliveries), like 7.15.
"""

from __future__ import annotations

import asyncio
import datetime
import heapq
import itertools
import re
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusConnectionError,
)
from azure.servicebus.management import CorrelationRuleFilter, SqlRuleFilter, TrueRuleFilter

MAX_NAME = 50
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,48}[A-Za-z0-9])?$")
FIVE_MINUTES = datetime.timedelta(minutes=5)


def _bad_request(text: str) -> HttpResponseError:
    error = HttpResponseError(message=f"400 Bad Request: {text}")
    error.status_code = 400
    return error


# --- SQL filters ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<op><>|=|\(|\))|(?P<word>[A-Za-z_$][\w.$]*)"
                    r"|(?P<bad>\S))")
_KEYWORDS = {"AND", "OR", "NOT", "LIKE", "ESCAPE"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.group("bad") is not None:
            raise _bad_request(f"cannot parse the SQL filter {text!r} at {position}")
        position = match.end()
        if match.group("str") is not None:
            out.append(("str", match.group("str")[1:-1].replace("''", "'")))
        elif match.group("op") is not None:
            out.append(("op", match.group("op")))
        else:
            word = match.group("word")
            out.append(("kw", word.upper()) if word.upper() in _KEYWORDS else ("id", word))
    return out


def _like_regex(pattern: str, escape: str | None) -> re.Pattern[str]:
    out = []
    chars = iter(pattern)
    for char in chars:
        if escape is not None and char == escape:
            following = next(chars, None)
            if following not in ("%", "_", escape):
                raise _bad_request(f"escape character {escape!r} not followed by %, _ or "
                                   f"itself in {pattern!r}")
            out.append(re.escape(following))
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.DOTALL)


Predicate = Callable[[dict[str, Any]], bool]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            raise _bad_request(f"expected {value or kind} at token {self.at}, got {token}")
        self.at += 1
        return token[1]

    def parse(self) -> Predicate:
        predicate = self.expr()
        if self.peek() is not None:
            raise _bad_request(f"unexpected {self.peek()} in the SQL filter")
        return predicate

    def expr(self) -> Predicate:
        left = self.term()
        while self.peek() == ("kw", "OR"):
            self.at += 1
            right = self.term()
            left = (lambda a, b: lambda p: a(p) or b(p))(left, right)
        return left

    def term(self) -> Predicate:
        left = self.factor()
        while self.peek() == ("kw", "AND"):
            self.at += 1
            right = self.factor()
            left = (lambda a, b: lambda p: a(p) and b(p))(left, right)
        return left

    def factor(self) -> Predicate:
        token = self.peek()
        if token == ("op", "("):
            self.at += 1
            inner = self.expr()
            self.take("op", ")")
            return inner
        if token == ("kw", "NOT"):
            self.at += 1
            inner = self.factor()
            return lambda p: not inner(p)
        name = self.take("id")
        key = name[5:] if name.lower().startswith("user.") else name
        if key.lower().startswith("sys."):
            raise _bad_request("the fake evaluates user properties only")
        token = self.peek()
        if token in (("op", "="), ("op", "<>")):
            self.at += 1
            value = self.take("str")
            equal = token[1] == "="
            return lambda p: key in p and ((p[key] == value) is equal)
        negate = False
        if token == ("kw", "NOT"):
            self.at += 1
            negate = True
        self.take("kw", "LIKE")
        pattern = self.take("str")
        escape = None
        if self.peek() == ("kw", "ESCAPE"):
            self.at += 1
            escape = self.take("str")
            if len(escape) != 1:
                raise _bad_request(f"ESCAPE takes one character, not {escape!r}")
        regex = _like_regex(pattern, escape)

        def like(p: dict[str, Any]) -> bool:
            value = p.get(key)
            if not isinstance(value, str):
                return False  # unknown: neither LIKE nor NOT LIKE holds
            return (regex.fullmatch(value) is not None) is not negate

        return like


def compile_filter(rule_filter: Any) -> Predicate:
    if isinstance(rule_filter, TrueRuleFilter):
        return lambda p: True
    if isinstance(rule_filter, SqlRuleFilter):
        if rule_filter.parameters:
            raise _bad_request("the fake takes no SQL filter parameters")
        return _Parser(rule_filter.sql_expression or "").parse()
    if isinstance(rule_filter, CorrelationRuleFilter):
        others = {k: v for k, v in vars(rule_filter).items() if k != "properties" and v}
        if others:
            raise _bad_request(f"the fake's correlation filters match properties only: {others}")
        wanted = dict(rule_filter.properties or {})
        if not wanted:
            raise _bad_request("a correlation filter needs at least one property")
        return lambda p: all(p.get(k) == v for k, v in wanted.items())
    raise TypeError(f"not a rule filter: {rule_filter!r}")


# --- the namespace -------------------------------------------------------------------------


class _Entry:
    """A message as one subscription keeps it."""

    __slots__ = ("body", "content_type", "dead_letter_reason", "delivery_count", "enqueued",
                 "lock", "message_id", "properties", "sequence_number", "session_id")

    def __init__(self, message: ServiceBusMessage, sequence_number: int) -> None:
        self.body = b"".join(message.body)
        self.properties = dict(message.application_properties or {})
        self.content_type = message.content_type
        self.message_id = message.message_id
        self.session_id = message.session_id
        self.sequence_number = sequence_number
        self.delivery_count = 0
        self.enqueued = datetime.datetime.now(datetime.timezone.utc)
        self.lock: _Lock | None = None
        self.dead_letter_reason: str | None = None

    def copy(self) -> _Entry:
        entry = _Entry.__new__(_Entry)
        for name in _Entry.__slots__:
            setattr(entry, name, getattr(self, name))
        entry.properties = dict(self.properties)
        entry.lock = None
        return entry


class _Lock:
    __slots__ = ("handle", "receiver", "token", "until")

    def __init__(self, receiver: FakeReceiver, until: float) -> None:
        self.token = uuid.uuid4()
        self.receiver = receiver
        self.until = until
        self.handle: asyncio.TimerHandle | None = None


class FakeSubscription:
    def __init__(self, name: str, lock_duration: float, max_delivery_count: int) -> None:
        self.name = name
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.rules: dict[str, Predicate] = {"$Default": lambda p: True}
        self.available: list[tuple[int, _Entry]] = []
        self.locked: dict[uuid.UUID, _Entry] = {}
        self.dead: list[_Entry] = []
        self.deleted = False
        self.auto_delete_on_idle: datetime.timedelta | None = None
        self.changed = asyncio.Event()
        self.received = 0

    def accepts(self, properties: dict[str, Any]) -> bool:
        return any(rule(properties) for rule in self.rules.values())

    def put_back(self, entry: _Entry) -> None:
        entry.lock = None
        if entry.delivery_count >= self.max_delivery_count:
            entry.dead_letter_reason = "MaxDeliveryCountExceeded"
            self.dead.append(entry)
            return
        heapq.heappush(self.available, (entry.sequence_number, entry))
        self.changed.set()

    def expire(self, token: uuid.UUID) -> None:
        entry = self.locked.pop(token, None)
        if entry is not None:
            entry.delivery_count += 1
            self.put_back(entry)


class FakeTopic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.subscriptions: dict[str, FakeSubscription] = {}


class FakeNamespace:
    """One Service Bus namespace in memory; ``client()`` and ``admin()`` are the factories to
    hand the adapter."""

    def __init__(self, max_message_size: int = 256 * 1024) -> None:
        self.topics: dict[str, FakeTopic] = {}
        self.max_message_size = max_message_size
        self.sequence = itertools.count(1)
        self.receive_failures: list[BaseException] = []
        """Exceptions the next receive calls raise, one each (a lost connection, say)."""
        self.receivers: weakref.WeakSet[FakeReceiver] = weakref.WeakSet()
        self.broken: weakref.WeakSet[FakeReceiver] = weakref.WeakSet()
        self.send_failures = 0
        self.settled = 0
        self.renewed = 0
        self.sent = 0
        self.last_sent: _Entry | None = None
        self.settle_delay = 0.0
        """Seconds each settlement waits for the (fake) service."""
        self.settling = 0
        self.settling_peak = 0
        """Most settlements in flight at once."""

    async def restart(self) -> None:
        """What the SDK sees of a service restart: every open receiver's next (or current)
        receive and the next send fail with ``ServiceBusConnectionError``. The messages stay:
        the service keeps them."""
        self.broken = weakref.WeakSet(self.receivers)
        self.send_failures = 1
        for topic in self.topics.values():
            for sub in topic.subscriptions.values():
                sub.changed.set()
        await asyncio.sleep(0)

    def client(self) -> FakeClient:
        return FakeClient(self)

    def admin(self) -> FakeAdministrationClient:
        return FakeAdministrationClient(self)

    def topic(self, name: str) -> FakeTopic:
        topic = self.topics.get(name)
        if topic is None:
            raise MessagingEntityNotFoundError(message=f"topic {name!r} does not exist")
        return topic

    def subscription(self, topic: str, name: str) -> FakeSubscription:
        sub = self.topic(topic).subscriptions.get(name)
        if sub is None or sub.deleted:
            raise MessagingEntityNotFoundError(
                message=f"subscription {topic}/Subscriptions/{name} does not exist")
        return sub

    def deliver(self, topic_name: str, message: ServiceBusMessage) -> None:
        if not isinstance(message, ServiceBusMessage):
            raise TypeError(f"send_messages takes ServiceBusMessage, not {type(message)}")
        topic = self.topic(topic_name)
        entry = _Entry(message, next(self.sequence))
        size = len(entry.body) + sum(len(str(k)) + len(str(v)) for k, v in
                                     entry.properties.items())
        if size > self.max_message_size:
            raise MessageSizeExceededError(message=f"message of {size} bytes is over "
                                           f"{self.max_message_size}")
        self.sent += 1
        self.last_sent = entry
        for sub in topic.subscriptions.values():
            if not sub.deleted and sub.accepts(entry.properties):
                copy = entry.copy()
                heapq.heappush(sub.available, (copy.sequence_number, copy))
                sub.changed.set()


class FakeReceivedMessage:
    """What a receiver hands out, with ``ServiceBusReceivedMessage``'s attribute names."""

    def __init__(self, entry: _Entry, receiver: FakeReceiver, peeked: bool) -> None:
        self._entry = entry
        self._receiver = receiver
        self._peeked = peeked
        self._settled = False
        self.lock_token = entry.lock.token if entry.lock is not None and not peeked else None
        self.sequence_number = entry.sequence_number
        self.delivery_count = entry.delivery_count
        self.message_id = entry.message_id
        self.session_id = entry.session_id
        self.content_type = entry.content_type
        self.enqueued_time_utc = entry.enqueued
        self.dead_letter_reason = entry.dead_letter_reason
        self.application_properties = {
            key.encode(): value.encode() if isinstance(value, str) else value
            for key, value in entry.properties.items()
        }
        self._body = entry.body

    @property
    def body(self) -> Any:
        return (section for section in [self._body])

    @property
    def locked_until_utc(self) -> datetime.datetime | None:
        lock = self._entry.lock
        if lock is None or self._peeked:
            return None
        loop = asyncio.get_running_loop()
        return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=lock.until - loop.time())


class FakeSender:
    def __init__(self, ns: FakeNamespace, topic_name: str) -> None:
        self._ns = ns
        self._topic = topic_name
        self._closed = False

    async def __aenter__(self) -> FakeSender:
        self._ns.topic(self._topic)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_messages(self, message: Any, *, timeout: float | None = None) -> None:
        if self._closed:
            raise ValueError("The handler has already been shutdown. Please use "
                             "ServiceBusClient to create a new instance.")
        messages = message if isinstance(message, list) else [message]
        await asyncio.sleep(0)  # the service's round trip
        if self._ns.send_failures:
            self._ns.send_failures -= 1
            raise connection_lost()
        for one in messages:
            self._ns.deliver(self._topic, one)

    async def close(self) -> None:
        self._closed = True


class FakeReceiver:
    def __init__(self, ns: FakeNamespace, topic_name: str, subscription_name: str,
                 receive_mode: Any, sub_queue: Any) -> None:
        if receive_mode not in (ServiceBusReceiveMode.PEEK_LOCK, "peeklock"):
            raise NotImplementedError("the fake receives in PEEK_LOCK mode only")
        self._ns = ns
        self._topic = topic_name
        self._name = subscription_name
        self._dead_letter = sub_queue == ServiceBusSubQueue.DEAD_LETTER
        self._closed = False
        ns.receivers.add(self)

    def _check_broken(self) -> None:
        if self in self._ns.broken:
            self._ns.broken.discard(self)
            raise connection_lost()

    def _sub(self) -> FakeSubscription:
        if self._closed:
            raise ValueError("The handler has already been shutdown. Please use "
                             "ServiceBusClient to create a new instance.")
        return self._ns.subscription(self._topic, self._name)

    async def __aenter__(self) -> FakeReceiver:
        self._sub()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def receive_messages(self, max_message_count: int | None = 1,
                               max_wait_time: float | None = None) -> list[FakeReceivedMessage]:
        if self._ns.receive_failures:
            raise self._ns.receive_failures.pop(0)
        self._check_broken()
        sub = self._sub()
        if self._dead_letter:
            raise NotImplementedError("the fake peeks the dead-letter queue only")
        count = max_message_count or 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (60.0 if max_wait_time is None else max_wait_time)
        while not sub.available:
            sub.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(sub.changed.wait(), left)
            except asyncio.TimeoutError:
                return []
            self._check_broken()
            sub = self._sub()  # deleted meanwhile?
        out = []
        while sub.available and len(out) < count:
            _, entry = heapq.heappop(sub.available)
            lock = entry.lock = _Lock(self, loop.time() + sub.lock_duration)
            lock.handle = loop.call_later(sub.lock_duration, sub.expire, lock.token)
            sub.locked[lock.token] = entry
            sub.received += 1
            out.append(FakeReceivedMessage(entry, self, peeked=False))
        return out

    async def peek_messages(self, max_message_count: int = 1, *, sequence_number: int = 0,
                            timeout: float | None = None) -> list[FakeReceivedMessage]:
        sub = self._sub()
        await asyncio.sleep(0)
        pool = sub.dead if self._dead_letter else [e for _, e in sub.available] + list(
            sub.locked.values())
        entries = sorted((e for e in pool if e.sequence_number >= sequence_number),
                         key=lambda e: e.sequence_number)
        return [FakeReceivedMessage(e, self, peeked=True) for e in entries[:max_message_count]]

    def _take(self, message: FakeReceivedMessage, action: str) -> tuple[FakeSubscription, _Entry]:
        if not isinstance(message, FakeReceivedMessage):
            raise TypeError(f"not a received message: {message!r}")
        if message._peeked:
            raise ValueError("a peeked message cannot be settled")
        if message._settled:
            raise MessageAlreadySettled(action=action)
        if message._receiver is not self:
            raise ValueError("the message was received by another receiver")
        sub = self._sub()
        entry = sub.locked.get(message.lock_token)  # type: ignore[arg-type]
        lock = entry.lock if entry is not None else None
        if entry is None or lock is None or lock.until < asyncio.get_running_loop().time():
            raise MessageLockLostError()
        return sub, entry

    def _unlock(self, sub: FakeSubscription, entry: _Entry,
                message: FakeReceivedMessage) -> None:
        lock = entry.lock
        assert lock is not None
        if lock.handle is not None:
            lock.handle.cancel()
        del sub.locked[lock.token]
        message._settled = True
        self._ns.settled += 1

    async def complete_message(self, message: FakeReceivedMessage) -> None:
        sub, entry = self._take(message, "complete")
        ns = self._ns
        ns.settling += 1
        ns.settling_peak = max(ns.settling_peak, ns.settling)
        try:
            await asyncio.sleep(ns.settle_delay)  # settlements wait for the service in 7.15
        finally:
            ns.settling -= 1
        sub, entry = self._take(message, "complete")
        self._unlock(sub, entry, message)

    async def abandon_message(self, message: FakeReceivedMessage) -> None:
        sub, entry = self._take(message, "abandon")
        await asyncio.sleep(0)
        sub, entry = self._take(message, "abandon")
        self._unlock(sub, entry, message)
        entry.delivery_count += 1
        sub.put_back(entry)

    async def dead_letter_message(self, message: FakeReceivedMessage, reason: str | None = None,
                                  error_description: str | None = None) -> None:
        sub, entry = self._take(message, "dead-letter")
        await asyncio.sleep(0)
        sub, entry = self._take(message, "dead-letter")
        self._unlock(sub, entry, message)
        entry.dead_letter_reason = reason
        entry.properties["DeadLetterReason"] = reason or ""
        entry.properties["DeadLetterErrorDescription"] = error_description or ""
        entry.lock = None
        sub.dead.append(entry)

    async def renew_message_lock(self, message: FakeReceivedMessage, *,
                                 timeout: float | None = None) -> datetime.datetime:
        sub, entry = self._take(message, "renew the lock of")
        await asyncio.sleep(0)
        sub, entry = self._take(message, "renew the lock of")
        lock = entry.lock
        assert lock is not None
        loop = asyncio.get_running_loop()
        lock.until = loop.time() + sub.lock_duration
        if lock.handle is not None:
            lock.handle.cancel()
        lock.handle = loop.call_later(sub.lock_duration, sub.expire, lock.token)
        self._ns.renewed += 1
        until = message.locked_until_utc
        assert until is not None
        return until

    async def close(self) -> None:
        self._closed = True


class FakeClient:
    """``ServiceBusClient``'s subset: senders and subscription receivers."""

    def __init__(self, ns: FakeNamespace) -> None:
        self._ns = ns
        self._handlers: list[FakeSender | FakeReceiver] = []
        self.closed = False

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_topic_sender(self, topic_name: str, **kwargs: Any) -> FakeSender:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        sender = FakeSender(self._ns, topic_name)
        self._handlers.append(sender)
        return sender

    def get_subscription_receiver(
        self, topic_name: str, subscription_name: str, *,
        receive_mode: Any = ServiceBusReceiveMode.PEEK_LOCK, sub_queue: Any = None,
        max_wait_time: float | None = None, prefetch_count: int = 0,
    ) -> FakeReceiver:
        receiver = FakeReceiver(self._ns, topic_name, subscription_name, receive_mode, sub_queue)
        self._handlers.append(receiver)
        return receiver

    async def close(self) -> None:
        self.closed = True
        for handler in self._handlers:
            await handler.close()


def _duration(value: Any) -> datetime.timedelta | None:
    if value is None or isinstance(value, datetime.timedelta):
        return value
    raise TypeError("the fake takes durations as timedelta")


class FakeAdministrationClient:
    """``ServiceBusAdministrationClient``'s subset: topics, subscriptions, rules."""

    _SUBSCRIPTION_OPTIONS = {"lock_duration", "max_delivery_count", "auto_delete_on_idle",
                             "default_message_time_to_live", "requires_session"}

    def __init__(self, ns: FakeNamespace) -> None:
        self._ns = ns
        self.calls = 0

    async def __aenter__(self) -> FakeAdministrationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        return None

    def _topic(self, name: str) -> FakeTopic:
        topic = self._ns.topics.get(name)
        if topic is None:
            raise ResourceNotFoundError(message=f"topic {name!r} not found")
        return topic

    def _sub(self, topic: str, name: str) -> FakeSubscription:
        sub = self._topic(topic).subscriptions.get(name)
        if sub is None:
            raise ResourceNotFoundError(message=f"subscription {name!r} not found")
        return sub

    @staticmethod
    def _check_name(name: str) -> None:
        if len(name) > MAX_NAME or not _NAME.match(name):
            raise _bad_request(f"invalid entity name {name!r}")

    async def get_topic(self, topic_name: str) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        return self._topic(topic_name)

    async def create_topic(self, topic_name: str) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        if topic_name in self._ns.topics:
            raise ResourceExistsError(message=f"topic {topic_name!r} exists")
        topic = self._ns.topics[topic_name] = FakeTopic(topic_name)
        return topic

    async def get_subscription(self, topic_name: str, subscription_name: str) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        return self._sub(topic_name, subscription_name)

    async def create_subscription(self, topic_name: str, subscription_name: str,
                                  **options: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        unknown = set(options) - self._SUBSCRIPTION_OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        self._check_name(subscription_name)
        topic = self._topic(topic_name)
        if subscription_name in topic.subscriptions:
            raise ResourceExistsError(message=f"subscription {subscription_name!r} exists")
        lock = _duration(options.get("lock_duration")) or datetime.timedelta(minutes=1)
        if lock > FIVE_MINUTES or lock <= datetime.timedelta(0):
            raise _bad_request("lock_duration is at most 5 minutes")
        idle = _duration(options.get("auto_delete_on_idle"))
        if idle is not None and idle < FIVE_MINUTES:
            raise _bad_request("auto_delete_on_idle is at least 5 minutes")
        max_delivery = options.get("max_delivery_count") or 10
        if options.get("requires_session"):
            raise NotImplementedError("the fake has no session-enabled subscriptions")
        sub = FakeSubscription(subscription_name, lock.total_seconds(), max_delivery)
        sub.auto_delete_on_idle = idle
        topic.subscriptions[subscription_name] = sub
        return sub

    async def delete_subscription(self, topic_name: str, subscription_name: str) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        topic = self._topic(topic_name)
        sub = self._sub(topic_name, subscription_name)
        del topic.subscriptions[subscription_name]
        sub.deleted = True
        for entry in sub.locked.values():
            if entry.lock is not None and entry.lock.handle is not None:
                entry.lock.handle.cancel()
        sub.changed.set()

    async def create_rule(self, topic_name: str, subscription_name: str, rule_name: str, *,
                          filter: Any = None, action: Any = None) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        if action is not None:
            raise NotImplementedError("the fake has no rule actions")
        self._check_name(rule_name)
        sub = self._sub(topic_name, subscription_name)
        if rule_name in sub.rules:
            raise ResourceExistsError(message=f"rule {rule_name!r} exists")
        sub.rules[rule_name] = compile_filter(filter if filter is not None else TrueRuleFilter())
        return rule_name

    async def delete_rule(self, topic_name: str, subscription_name: str, rule_name: str) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        sub = self._sub(topic_name, subscription_name)
        if rule_name not in sub.rules:
            raise ResourceNotFoundError(message=f"rule {rule_name!r} not found")
        del sub.rules[rule_name]


def connection_lost() -> ServiceBusConnectionError:
    return ServiceBusConnectionError(message="the connection was lost (fake)")

"""The adapter contract: what a broker adapter implements, and nothing more.

The bus owns messages, the envelope, retries, dead-lettering, request/reply and metrics. An adapter
only moves bytes plus string headers to and from its broker, acknowledges them, and declares in
:class:`Capabilities` what its broker can do. A new adapter is one subclass of :class:`Broker`
plus one test module that runs :mod:`amb_core.testing` against it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, TypeVar

from amb_core.errors import UnsupportedFeature

if TYPE_CHECKING:
    from amb_core.message import Message

B = TypeVar("B", bound="Broker")

INBOX_PREFIX = "_amb.inbox."
"""Topics under this prefix are reply inboxes: the bus reads them only while it waits for a
reply, so adapters never keep them in a log, a stream or a durable queue."""


@dataclass(frozen=True)
class Capabilities:
    """What a broker can do. The contract suite skips a case only when a flag here says so."""

    wildcards: bool = True
    consumer_groups: bool = True
    persistent: bool = False
    """Messages published while no group member runs wait for the first member that joins."""
    redelivers_unacked: bool = False
    """A member that dies without acknowledging has its message redelivered to another member."""
    replay: bool = False
    ordering: bool = True
    at_least_once: bool = False
    """Duplicates are possible (the suite then checks the set, not the count)."""
    headers: bool = True
    """Binary-mode envelope (attributes as headers); otherwise structured JSON."""
    native_request_reply: bool = False
    """The adapter implements :meth:`Broker.request` with the broker's own mechanism."""
    reconnect: bool = False
    """The adapter survives a broker restart and restores its subscriptions by itself."""
    max_payload: int | None = None
    """Largest body in bytes the broker accepts; None means no limit that matters here."""
    ordering_keys: bool = False
    """Messages with the same ``Message.key`` keep their order across a consumer group's
    members (Kafka partitions, SQS FIFO message groups, Service Bus sessions)."""


class Delivery:
    """One received message as the adapter hands it to the bus.

    Adapters subclass it to implement :meth:`ack` (and :meth:`retry_later` where the broker can
    redeliver later). ``delivery_count`` is the broker's own count where it keeps one (JetStream,
    quorum queues, Redis XCLAIM), else None. ``reply_to`` is set by adapters with native
    request/reply. ``position`` is the log position for brokers that keep a log. ``message`` is
    set only by in-process brokers, which hand over an already decoded Message.
    """

    __slots__ = ("body", "delivery_count", "headers", "message", "position", "reply_to", "topic")

    def __init__(
        self,
        topic: str,
        body: bytes,
        headers: dict[str, str],
        *,
        delivery_count: int | None = None,
        reply_to: str | None = None,
        position: int | str | None = None,
        message: Message | None = None,
    ) -> None:
        self.topic = topic
        self.body = body
        self.headers = headers
        self.delivery_count = delivery_count
        self.reply_to = reply_to
        self.position = position
        self.message = message

    async def ack(self) -> None:
        """The bus is done with this message (handled, or dead-lettered). Default: nothing to do."""

    async def retry_later(self, delay: float) -> bool:
        """Ask the broker to redeliver after ``delay`` seconds.

        Return True if the broker took it (the bus then forgets the message), False to have the
        bus retry in process (the default, for brokers without delayed redelivery).
        """
        return False


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
"""What an adapter calls per message, in order per subscription. It returns once the bus has
taken the message; it blocks while the subscription's handlers are all busy (backpressure)."""


class BrokerSubscription(ABC):
    @abstractmethod
    async def close(self) -> None:
        """Stop delivering. Unacknowledged messages go back to the broker where it keeps them."""


class Broker(ABC):
    """Base class of every adapter.

    ``capabilities`` is a class attribute adapters override; an instance whose options change
    what it can do (NATS with or without JetStream) assigns its own in ``__init__``.
    """

    capabilities: Capabilities = Capabilities()
    header_prefix: ClassVar[str] = "ce-"
    """Prefix of CloudEvents attributes in binary mode (``ce-`` NATS/HTTP, ``ce_`` Kafka ...)."""
    in_process: ClassVar[bool] = False
    """The bus calls :meth:`publish_local` and deliveries carry ``message`` (no wire encoding)."""
    default_dead_letter_topic: str = "amb.dead-letter"
    """Where the bus dead-letters when the subscription names no ``dead_letter_topic``."""

    @classmethod
    def from_url(cls: type[B], url: str) -> B:
        """The adapter configured from a URL (``redis://...``); no I/O."""
        raise UnsupportedFeature(f"{cls.__name__} cannot be configured from a URL")

    @abstractmethod
    async def connect(self) -> None:
        """Connect; raise a :class:`BrokerConnectionError` within the connect timeout on failure."""

    @abstractmethod
    async def close(self) -> None:
        """Flush pending publishes and disconnect. Called after the bus drained its handlers."""

    @abstractmethod
    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        """Send one message. Returns once the broker's delivery guarantee for this path holds.

        ``headers`` belong to the caller: an adapter reads them and never changes them. After
        :meth:`close` (or before :meth:`connect`) it raises :class:`NotConnected`.
        """

    @abstractmethod
    async def subscribe(
        self,
        pattern: str,
        handler: DeliveryHandler,
        *,
        group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        """Start delivering messages of ``pattern`` to ``handler``; return once the broker has
        the subscription (a message published after this returns reaches it).

        With ``group``, each message goes to exactly one subscription of that group (and, on
        persistent brokers, waits for one while none runs). ``prefetch`` is how many messages
        the broker may push ahead of acknowledgement.
        """

    async def send_reply(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        """Send a reply to an address from a request's ``reply_to``. Default: publish to it."""
        await self.publish(reply_to, body, headers)

    async def request(
        self, topic: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Delivery:
        """Native request/reply (only where ``capabilities.native_request_reply``)."""
        raise UnsupportedFeature(f"{type(self).__name__} has no native request/reply")

    def replay(
        self, topic: str, since: int | str | datetime | None
    ) -> AsyncIterator[Delivery]:
        """The messages of ``topic`` kept in the broker's log, oldest first, then stop.

        ``since``: None from the start, an int or str position (inclusive), a datetime a time.
        """
        raise UnsupportedFeature(f"{type(self).__name__} keeps no log to replay")

    async def delete_group(self, pattern: str, group: str) -> None:
        """Remove the broker-side state of consumer group ``group`` on ``pattern`` (its stream
        group, durable consumer or queue, with the messages waiting in it)."""
        raise UnsupportedFeature(f"{type(self).__name__} keeps no consumer-group state to delete")

    # --- dead letters ------------------------------------------------------------------------

    async def keep_dead_letters(self, topic: str) -> None:
        """``topic`` is a dead-letter destination: from now on keep what is published to it,
        whether or not anyone subscribes yet, and let a consumer group that subscribes to it
        later start at the oldest letter kept. The bus calls it for a subscription's
        dead-letter destination before the subscription starts. Default: nothing (brokers
        that keep nothing)."""
        return None

    def dead_letters(self, topic: str) -> AsyncIterator[Delivery]:
        """The letters kept at dead-letter destination ``topic``, oldest first, without
        removing them; each delivery's ``position`` names it for :meth:`remove_dead_letters`.
        Default: the replay log, where the broker keeps one."""
        if not self.capabilities.replay:
            raise UnsupportedFeature(f"{type(self).__name__} keeps no dead letters to list")
        return self.replay(topic, None)

    async def remove_dead_letters(self, topic: str, positions: list[int | str]) -> int:
        """Remove the letters at ``positions`` from ``topic`` (after a redrive); return how
        many were removed. Raises :class:`UnsupportedFeature` where the broker cannot."""
        raise UnsupportedFeature(
            f"{type(self).__name__} cannot remove single messages from {topic!r}"
        )

    def publish_local(self, msg: Message) -> Awaitable[None] | None:
        """In-process brokers (``in_process = True``) only: take a Message without the wire.

        Returns None when the message was taken at once, or an awaitable to wait on while a
        subscriber's buffer is full (so the common case costs no coroutine).
        """
        raise UnsupportedFeature(f"{type(self).__name__} is not an in-process broker")


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]*@")


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``, for reprs and log lines."""
    return _URL_PASSWORD.sub(r"\g<scheme>***@", url)

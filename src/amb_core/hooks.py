"""The hooks the bus calls on its paths, declared here and implemented by observability.

The bus depends on these declarations only; :mod:`amb_core.observability` implements them
and depends on them too, never on the bus. So metrics and tracing wrap the bus's one
handle -> reply -> ack sequence instead of copying it, and neither imports the other's
internals. When observability is off the bus holds None and pays one ``if`` per path.

Cost model of the consumer side: the bus counts ``stats.delivered`` / ``succeeded`` in place
and calls :meth:`SubscriptionProbe.start_timing` only for the deliveries the probe wants timed
(it sets ``skip`` to the number to leave out until the next), so the steady state makes no
call per message. Tracing, when a tracer provider is set, brackets the sequence with
:meth:`SubscriptionProbe.start_span` and :meth:`SubscriptionProbe.end_span`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from amb_core.broker import Broker
    from amb_core.message import Message


class Counters(Protocol):
    """Per-subscription counts the bus updates in place."""

    delivered: int
    succeeded: int
    failed: int


class PublishCounters(Protocol):
    published: int


class ObservedSubscription(Protocol):
    """What a probe may read of the subscription it watches."""

    @property
    def pattern(self) -> str: ...

    @property
    def group(self) -> str | None: ...

    @property
    def in_flight(self) -> int:
        """Handler calls running now (or waiting to be retried)."""
        ...


class SubscriptionProbe(Protocol):
    """One subscription's metrics and spans."""

    skip: int
    """Deliveries to leave untimed before the next :meth:`start_timing` (sampling)."""

    @property
    def stats(self) -> Counters: ...

    @property
    def tracing(self) -> object | None:
        """Set while a tracer provider is in use: the bus then calls the span hooks."""
        ...

    def start_timing(self, msg: Message) -> None: ...

    def stop_timing(self) -> None: ...

    def start_span(self, msg: Message) -> object:
        """Open the CONSUMER span of ``msg`` and make it current; returns what
        :meth:`end_span` needs."""
        ...

    def end_span(self, token: object) -> None: ...

    def attempt_failed(self, msg: Message, exc: BaseException) -> None:
        """A handler call raised (counted; recorded on the span)."""
        ...

    def retrying(self, msg: Message, delay: float) -> None: ...

    def expired(self, msg: Message) -> None:
        """``msg`` waited past its caller's deadline and is not handled."""
        ...

    def dead_lettered(self, msg: Message, destination: str) -> None: ...


class Observer(Protocol):
    """A bus's observer: producer-side figures, spans, and a probe per subscription."""

    @property
    def tracing(self) -> object | None: ...

    @property
    def topic_stats(self) -> Mapping[str, PublishCounters]:
        """Per published topic; the bus counts a plain publish here directly (hot path)."""
        ...

    def refresh(self) -> None:
        """Look again for a tracer provider (the bus calls it on connect)."""
        ...

    def probe(self, sub: ObservedSubscription) -> SubscriptionProbe: ...

    def publishing(self, msg: Message, reply: bool = False) -> Any:
        """Before a publish, only while ``tracing`` is set: the PRODUCER span (or None)."""
        ...

    def published(self, msg: Message, span: Any, reply: bool = False) -> None: ...

    def failed(self, span: Any, exc: BaseException) -> None: ...

    def request(
        self, request: Message, timeout: float,
        send: Callable[[Message, float], Awaitable[Message]],
    ) -> Awaitable[Message]:
        """Around ``send(request, timeout)``: round-trip figures and a CLIENT span."""
        ...


class ObservedBus(Protocol):
    """What observability needs of a bus: its broker, and a way to attach an observer."""

    @property
    def broker(self) -> Broker: ...

    def attach_observer(self, observer: Observer | None) -> None: ...

"""OpenTelemetry spans for publish, process and request, and W3C trace context in headers.

Imported only when a tracer provider is in use, so opentelemetry is never needed otherwise.
The trace context travels as ordinary message headers (``traceparent``, ``tracestate``, and
``baggage`` when set, written by the global propagator, W3C Trace Context by default), so it
crosses every broker the way user headers do.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from amb_core.hooks import ObservedSubscription
    from amb_core.message import Message

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_SCOPE = "amb_core"

Span = trace.Span


def _version() -> str:
    from amb_core._version import __version__

    return __version__


class Tracing:
    """Makes the spans of one tracer provider."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(_SCOPE, _version())

    def __repr__(self) -> str:
        return f"<Tracing {self.provider!r}>"

    @staticmethod
    def _attributes(msg: Message, system: str, operation: str | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": system,
            "messaging.destination.name": msg.topic,
            "messaging.message.id": msg.id,
        }
        if operation is not None:
            attributes["messaging.operation.type"] = operation
        if msg.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = msg.correlation_id
            attributes["amb.correlation_id"] = msg.correlation_id
        if msg.causation_id is not None:
            attributes["amb.causation_id"] = msg.causation_id
        return attributes

    def _inject(self, msg: Message, span: Span) -> None:
        headers = msg.headers
        headers.pop(TRACESTATE, None)  # never leave a stale one next to a new traceparent
        propagate.inject(headers, context=trace.set_span_in_context(span))

    def start_publish(self, msg: Message, system: str, label: str) -> Span:
        """A PRODUCER span; its context is written into ``msg.headers``.

        The parent is the active span; with none active, a ``traceparent`` the caller put in the
        headers (say, from an incoming HTTP request) is honoured as the parent.
        """
        parent: Context | None = None
        if TRACEPARENT in msg.headers and not trace.get_current_span().get_span_context().is_valid:
            parent = propagate.extract(msg.headers, context=Context())
        span: Span = self.tracer.start_span(
            f"publish {label}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=self._attributes(msg, system, "send"),
        )
        self._inject(msg, span)
        return span

    def start_process(
        self, msg: Message, sub: ObservedSubscription, system: str
    ) -> tuple[Span, object]:
        """A CONSUMER span, child of the context in the message's headers, made current for the
        handler (so what it publishes continues the trace). Returns the span and the token to
        :meth:`end_process` with."""
        parent = propagate.extract(msg.headers, context=Context())
        attributes = self._attributes(msg, system, "process")
        attributes["messaging.destination.subscription.name"] = sub.pattern
        attributes["amb.attempt"] = msg.attempt
        if sub.group is not None:
            attributes["messaging.consumer.group.name"] = sub.group
        span = self.tracer.start_span(
            f"process {sub.pattern}", context=parent, kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    def start_request(
        self, msg: Message, system: str, label: str, timeout: float
    ) -> tuple[Span, object]:
        """A CLIENT span around a whole request/reply, made current (the request's publish span
        is its child); its context is also put in the headers for brokers whose native
        request/reply does not go through publish."""
        attributes = self._attributes(msg, system, None)
        attributes["amb.request.timeout"] = timeout
        span = self.tracer.start_span(
            f"request {label}", kind=SpanKind.CLIENT, attributes=attributes
        )
        self._inject(msg, span)
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    @staticmethod
    def fail(span: Span, exc: BaseException, end: bool = True) -> None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        if end:
            span.end()

    @staticmethod
    def current_span() -> Span:
        return trace.get_current_span()

    @staticmethod
    def mark_error(span: Span, description: str) -> None:
        span.set_status(Status(StatusCode.ERROR, description))


_cache: dict[int, Tracing] = {}


def tracing_for(provider: Any) -> Tracing:
    tracing = _cache.get(id(provider))
    if tracing is None or tracing.provider is not provider:
        tracing = Tracing(provider)
        _cache[id(provider)] = tracing
    return tracing


def global_provider() -> Any:
    """The global tracer provider once an SDK has set one; None while it is the no-op proxy."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider

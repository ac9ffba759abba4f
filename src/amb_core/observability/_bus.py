"""The built-in bus metrics, and the observer the bus calls on its paths.

Cost model: the bus holds ``_observer`` (None when observability is off: one ``if`` per path and
nothing else). When on, the hot paths update plain integer and float fields of small
``__slots__`` objects, keyed by bounded labels, on the event loop; nothing is formatted,
locked or allocated per message. The Prometheus collector (and the OpenTelemetry observable
instruments) read those fields when scraped. Spans are made only when a tracer provider is
in use.

Labels: ``broker`` (the adapter: memory, redis, nats ...) and, on the consumer side, ``pattern``
(the subscription's pattern as given to ``subscribe``: bounded by the subscriptions you make),
on the producer side ``topic`` (the published topic through ``settings.topic_label``, by default
its first two segments, see :func:`default_topic_label`; at most ``max_topic_labels`` distinct
values per broker, then ``_other``).

Counters are updated without a lock from the thread running the bus's event loop. Buses of one
process share them; buses run in several threads at once may, rarely, lose an increment.
"""

from __future__ import annotations

import logging
import threading
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter, time
from typing import TYPE_CHECKING, Any

from amb_core.errors import RequestTimeout
from amb_core.observability import _config
from amb_core.observability._config import REPLY_LABEL, Settings, settings

if TYPE_CHECKING:
    from amb_core.broker import Broker
    from amb_core.hooks import ObservedBus, ObservedSubscription
    from amb_core.message import Message
    from amb_core.observability._tracing import Span, Tracing

logger = logging.getLogger(__name__)

HANDLER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)
LAG_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0,
)
REQUEST_BUCKETS = HANDLER_BUCKETS
OTHER_LABEL = "_other"


class Histogram:
    """Bucket counts and a sum, updated and read under a lock (observations are rare enough:
    see the sampling in :class:`Probe`), so a scrape from another thread is consistent."""

    __slots__ = ("_lock", "attributes", "bounds", "counts", "otel", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.otel: Any = None  # an OpenTelemetry Histogram, once OpenTelemetry metrics are on
        self.attributes: dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, weight: int = 1) -> None:
        """Record ``value`` (negative counts as 0), ``weight`` times (a sampled observation
        standing for ``weight`` deliveries)."""
        if value < 0.0:
            value = 0.0
        with self._lock:
            self.counts[bisect_left(self.bounds, value)] += weight
            self.sum += value * weight
        if self.otel is not None:
            self.otel.record(value, self.attributes)

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self.counts)

    def cumulative(self) -> tuple[list[tuple[str, float]], int, float]:
        with self._lock:
            counts = list(self.counts)
            total_sum = self.sum
        total = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(self.bounds, counts[:-1], strict=True):
            total += count
            buckets.append((_float_text(bound), total))
        total += counts[-1]
        buckets.append(("+Inf", total))
        return buckets, total, total_sum


def _float_text(value: float) -> str:
    return repr(float(value))


class SubscriptionStats:
    """Consumer-side figures of one (broker, pattern). ``in_flight`` is read from the live
    subscriptions when scraped (the bus counts its running handlers anyway)."""

    __slots__ = (
        "dead_lettered", "delivered", "expired", "failed", "handler", "labels", "lag",
        "retried", "subscriptions", "succeeded",
    )

    def __init__(self, broker: str, pattern: str) -> None:
        self.labels = (broker, pattern)
        self.delivered = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.expired = 0
        self.handler = Histogram(HANDLER_BUCKETS)
        self.lag = Histogram(LAG_BUCKETS)
        self.subscriptions: weakref.WeakSet[ObservedSubscription] = weakref.WeakSet()

    @property
    def in_flight(self) -> int:
        """Messages being handled now (handler running or waiting to retry)."""
        subscriptions: list[ObservedSubscription] = []
        for _ in range(3):  # read from the scrape thread: a subscribe meanwhile may interfere
            try:
                subscriptions = list(self.subscriptions)
                break
            except RuntimeError:
                continue
        return sum(sub.in_flight for sub in subscriptions)


class TopicStats:
    """Producer-side figures of one (broker, topic label)."""

    __slots__ = ("errors", "labels", "published", "request", "timeouts")

    def __init__(self, broker: str, label: str) -> None:
        self.labels = (broker, label)
        self.published = 0
        self.request = Histogram(REQUEST_BUCKETS)
        self.timeouts = 0
        self.errors = 0


# name, help, field (counters of SubscriptionStats)
_SUB_COUNTERS = (
    ("amb_messages_delivered", "Messages delivered to a subscription's handler.", "delivered"),
    ("amb_handler_succeeded", "Handler calls that returned normally.", "succeeded"),
    ("amb_handler_failed", "Handler calls that raised (every attempt counts).", "failed"),
    ("amb_messages_retried", "Retries scheduled after a failed handler call.", "retried"),
    ("amb_messages_dead_lettered", "Messages sent to a dead-letter destination.",
     "dead_lettered"),
    ("amb_messages_expired",
     "Messages not handled because they waited past their caller's deadline.", "expired"),
)
_OTEL_NAMES = {
    "delivered": "amb.messages.delivered",
    "succeeded": "amb.handler.succeeded",
    "failed": "amb.handler.failed",
    "retried": "amb.messages.retried",
    "dead_lettered": "amb.messages.dead_lettered",
    "expired": "amb.messages.expired",
}
_SUB_HISTOGRAMS = (
    ("amb_handler_duration_seconds", "Duration of one handler call.", "handler"),
    ("amb_delivery_lag_seconds",
     "Time from the message's timestamp (set by its producer) to the start of its handling.",
     "lag"),
)


class BusMetricsStore:
    """The process's built-in bus figures; a Prometheus collector over them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.subscriptions: dict[tuple[str, str], SubscriptionStats] = {}
        self.topics: dict[tuple[str, str], TopicStats] = {}
        self._labels_per_broker: dict[str, int] = {}
        self._registered: list[Any] = []  # registries we are registered in
        self._otel_meter: Any = None
        self._otel_histograms: dict[str, Any] = {}

    # --- figures -----------------------------------------------------------------------------

    def subscription(self, broker: str, pattern: str) -> SubscriptionStats:
        key = (broker, pattern)
        stats = self.subscriptions.get(key)
        if stats is None:
            with self._lock:
                stats = self.subscriptions.get(key)
                if stats is None:
                    stats = SubscriptionStats(broker, pattern)
                    self._otel_attach_sub(stats)
                    self.subscriptions[key] = stats
        return stats

    def topic(self, broker: str, label: str, limit: int | None = None) -> TopicStats:
        key = (broker, label)
        stats = self.topics.get(key)
        if stats is None:
            with self._lock:
                stats = self.topics.get(key)
                if stats is None:
                    used = self._labels_per_broker.get(broker, 0)
                    if limit is not None and used >= limit and label != OTHER_LABEL:
                        return self._other(broker)
                    stats = TopicStats(broker, label)
                    self._otel_attach_topic(stats)
                    self.topics[key] = stats
                    self._labels_per_broker[broker] = used + 1
        return stats

    def _other(self, broker: str) -> TopicStats:
        # called with the lock held
        key = (broker, OTHER_LABEL)
        stats = self.topics.get(key)
        if stats is None:
            if not self._labels_per_broker.get(f"warned:{broker}"):
                self._labels_per_broker[f"warned:{broker}"] = 1
                logger.warning(
                    "more than %d distinct topic labels on %s: further topics are counted as %r;"
                    " configure amb_core.observability.configure(topic_label=...)",
                    settings.max_topic_labels, broker, OTHER_LABEL,
                )
            stats = TopicStats(broker, OTHER_LABEL)
            self._otel_attach_topic(stats)
            self.topics[key] = stats
        return stats

    # --- Prometheus --------------------------------------------------------------------------

    def register(self, registry: Any) -> None:
        """Add this collector to a prometheus_client registry (once per registry)."""
        with self._lock:
            if any(r is registry for r in self._registered):
                return
            registry.register(self)
            self._registered.append(registry)

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        return iter(self._families())

    def _families(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        subs = list(self.subscriptions.values())
        topics = list(self.topics.values())
        families: list[Any] = []
        published = CounterMetricFamily(
            "amb_messages_published", "Messages published (replies under topic=\"_reply\").",
            labels=("broker", "topic"),
        )
        for t in topics:
            published.add_metric(t.labels, t.published)
        families.append(published)
        for name, doc, field in _SUB_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=("broker", "pattern"))
            for s in subs:
                family.add_metric(s.labels, getattr(s, field))
            families.append(family)
        in_flight = GaugeMetricFamily(
            "amb_handlers_in_flight", "Handler calls running now.", labels=("broker", "pattern")
        )
        for s in subs:
            in_flight.add_metric(s.labels, s.in_flight)
        families.append(in_flight)
        for name, doc, field in _SUB_HISTOGRAMS:
            histogram = HistogramMetricFamily(name, doc, labels=("broker", "pattern"))
            for s in subs:
                buckets, _, total = getattr(s, field).cumulative()
                histogram.add_metric(s.labels, buckets, total)
            families.append(histogram)
        request = HistogramMetricFamily(
            "amb_request_duration_seconds", "Round trip of answered requests.",
            labels=("broker", "topic"),
        )
        failures = CounterMetricFamily(
            "amb_request_failures", "Requests that got no reply.",
            labels=("broker", "topic", "reason"),
        )
        for t in topics:
            if t.request.count or t.timeouts or t.errors:
                buckets, _, total = t.request.cumulative()
                request.add_metric(t.labels, buckets, total)
                failures.add_metric((*t.labels, "timeout"), t.timeouts)
                failures.add_metric((*t.labels, "error"), t.errors)
        families.append(request)
        families.append(failures)
        return families

    # --- OpenTelemetry -----------------------------------------------------------------------

    def enable_opentelemetry(self, meter_provider: Any) -> None:
        """Export the same figures as OpenTelemetry instruments of ``meter_provider``:
        observable counters and an up-down counter read when the reader collects, histograms
        recorded as they happen."""
        from opentelemetry.metrics import CallbackOptions, Observation

        with self._lock:
            if self._otel_meter is not None:
                return
            meter = meter_provider.get_meter("amb_core")

            def sub_counter(field: str) -> Callable[[CallbackOptions], Iterator[Observation]]:
                def observe(options: CallbackOptions) -> Iterator[Observation]:
                    for s in list(self.subscriptions.values()):
                        yield Observation(
                            getattr(s, field), {"broker": s.labels[0], "pattern": s.labels[1]}
                        )
                return observe

            def topic_counter(field: str) -> Callable[[CallbackOptions], Iterator[Observation]]:
                def observe(options: CallbackOptions) -> Iterator[Observation]:
                    for t in list(self.topics.values()):
                        yield Observation(
                            getattr(t, field), {"broker": t.labels[0], "topic": t.labels[1]}
                        )
                return observe

            meter.create_observable_counter(
                "amb.messages.published", [topic_counter("published")], unit="{message}"
            )
            for _, doc, field in _SUB_COUNTERS:
                meter.create_observable_counter(
                    _OTEL_NAMES[field], [sub_counter(field)], description=doc
                )
            meter.create_observable_up_down_counter(
                "amb.handlers.in_flight", [sub_counter("in_flight")], unit="{call}"
            )
            meter.create_observable_counter(
                "amb.request.timeouts", [topic_counter("timeouts")], unit="{request}"
            )
            meter.create_observable_counter(
                "amb.request.errors", [topic_counter("errors")], unit="{request}"
            )
            self._otel_histograms = {
                "handler": meter.create_histogram("amb.handler.duration", unit="s"),
                "lag": meter.create_histogram("amb.delivery.lag", unit="s"),
                "request": meter.create_histogram("amb.request.duration", unit="s"),
            }
            self._otel_meter = meter
            for s in self.subscriptions.values():
                self._otel_attach_sub(s)
            for t in self.topics.values():
                self._otel_attach_topic(t)

    def _otel_attach_sub(self, stats: SubscriptionStats) -> None:
        if self._otel_histograms:
            attributes = {"broker": stats.labels[0], "pattern": stats.labels[1]}
            for field in ("handler", "lag"):
                histogram: Histogram = getattr(stats, field)
                histogram.attributes = attributes
                histogram.otel = self._otel_histograms[field]

    def _otel_attach_topic(self, stats: TopicStats) -> None:
        if self._otel_histograms:
            stats.request.attributes = {"broker": stats.labels[0], "topic": stats.labels[1]}
            stats.request.otel = self._otel_histograms["request"]


STORE = BusMetricsStore()


def broker_label(broker: Broker) -> str:
    """``memory``, ``redis``, ``nats`` ... for amb's adapters; the class name otherwise."""
    cls = type(broker)
    module = cls.__module__
    if module.startswith("amb_core.adapters."):
        return module.split(".")[2]  # the adapter's module or package: adapters.<name>[...]
    name = cls.__name__
    return (name[:-6] if name.endswith("Broker") and len(name) > 6 else name).lower()


def _resolve_tracing(provider: Any) -> Tracing | None:
    if provider is None:
        if not _config.opentelemetry_available():
            return None
        from amb_core.observability._tracing import global_provider

        provider = global_provider()
        if provider is None:
            return None
    from amb_core.observability._tracing import tracing_for

    return tracing_for(provider)


class BusObserver:
    """What one bus calls when observability is on (the :class:`amb_core.hooks.Observer`
    hooks). Made by the bus (see :func:`observer_for`) or by
    :func:`amb_core.observability.instrument`."""

    __slots__ = (
        "_config", "_probes", "_reply_stats", "_tracer_provider", "broker", "store", "topic_stats",
        "tracing",
    )

    def __init__(
        self,
        bus: ObservedBus,
        *,
        tracer_provider: Any = None,
        config: Settings | None = None,
        store: BusMetricsStore | None = None,
    ) -> None:
        self._config = config or settings
        self.store = store or STORE
        self.broker = broker_label(bus.broker)
        self._tracer_provider = tracer_provider
        self.topic_stats: dict[str, TopicStats] = {}
        """Per published topic; the bus counts a publish here directly on its hot path."""
        self._reply_stats = self.store.topic(self.broker, REPLY_LABEL)
        self.tracing: Tracing | None = None
        self._probes: weakref.WeakSet[Probe] = weakref.WeakSet()
        self.refresh()
        registry = self._config.prometheus_registry()
        if registry is not None:
            self.store.register(registry)
        if self._config.meter_provider is not None:
            self.store.enable_opentelemetry(self._config.meter_provider)

    def __repr__(self) -> str:
        tracing = "tracing" if self.tracing is not None else "no tracing"
        return f"<BusObserver broker={self.broker!r} {tracing}>"

    def refresh(self) -> None:
        """Look for the tracer provider again (the bus calls it on connect)."""
        self.tracing = _resolve_tracing(self._tracer_provider or self._config.tracer_provider)
        for probe in list(self._probes):
            probe.tracing = self.tracing

    # --- publish -----------------------------------------------------------------------------

    def _topic(self, topic: str) -> TopicStats:
        stats = self.topic_stats.get(topic)
        if stats is None:
            config = self._config
            stats = self.store.topic(self.broker, config.topic_label(topic),
                                     config.max_topic_labels)
            if len(self.topic_stats) > 10_000:
                self.topic_stats.clear()
            self.topic_stats[topic] = stats
        return stats

    def publishing(self, msg: Message, reply: bool = False) -> Span | None:
        """Before a publish (the bus calls it only while ``tracing`` is set): the PRODUCER
        span, with its ``traceparent`` put in ``msg.headers``."""
        tracing = self.tracing
        if tracing is None:
            return None
        label = REPLY_LABEL if reply else self._topic(msg.topic).labels[1]
        return tracing.start_publish(msg, self.broker, label)

    def published(self, msg: Message, span: Span | None, reply: bool = False) -> None:
        """After the broker took the message (``reply``: a reply, from ``_send_reply``)."""
        stats = self.topic_stats.get(msg.topic) if not reply else self._reply_stats
        if stats is None:
            stats = self._topic(msg.topic)
        stats.published += 1
        if span is not None:
            span.end()

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        """The publish ``span`` belongs to raised ``exc``."""
        from amb_core.observability._tracing import Tracing

        Tracing.fail(span, exc)

    # --- consume -----------------------------------------------------------------------------

    def probe(self, sub: ObservedSubscription) -> Probe:
        probe = Probe(self, sub)
        self._probes.add(probe)
        return probe

    # --- request -----------------------------------------------------------------------------

    async def request(
        self,
        request: Message,
        timeout: float,
        send: Callable[[Message, float], Awaitable[Message]],
    ) -> Message:
        """Around ``send(request, timeout)``: the round-trip histogram, failures, a CLIENT span."""
        stats = self._topic(request.topic)
        tracing = self.tracing
        span: Span | None = None
        token: object = None
        if tracing is not None:
            span, token = tracing.start_request(request, self.broker, stats.labels[1], timeout)
        start = perf_counter()
        try:
            reply = await send(request, timeout)
        except RequestTimeout as exc:
            stats.timeouts += 1
            if span is not None and tracing is not None:
                tracing.fail(span, exc, end=False)
            raise
        except Exception as exc:
            stats.errors += 1
            if span is not None and tracing is not None:
                tracing.fail(span, exc, end=False)
            raise
        finally:
            if span is not None:
                if tracing is not None:
                    tracing.detach(token)
                span.end()
        stats.request.observe(perf_counter() - start)
        return reply


SAMPLE_RATE = 1000.0
"""Deliveries per second per subscription up to which every delivery is timed."""
MAX_SAMPLE_EVERY = 256


class Probe:
    """The observer's part in one subscription (the :class:`amb_core.hooks.SubscriptionProbe`
    hooks): the bus counts in :attr:`stats` in place and calls the timing and span hooks
    around its one handle -> reply -> ack sequence.

    Counts are exact. The two histograms (handler duration, delivery lag) time every delivery
    while a subscription gets up to :data:`SAMPLE_RATE` messages a second; above that, one
    delivery in ``every`` (a power of two, re-chosen at least each second) is timed and counted
    ``every`` times, so the histograms' counts, sums and quantiles stay right on average while
    the per-message cost stays flat. Retries are always timed.
    """

    __slots__ = (
        "__weakref__", "_every", "_handler", "_lag", "_observer", "_start", "_sub", "_weight",
        "_window_count", "_window_start", "skip", "stats", "tracing",
    )

    def __init__(self, observer: BusObserver, sub: ObservedSubscription) -> None:
        self._observer = observer
        self._sub = sub
        self.stats = observer.store.subscription(observer.broker, sub.pattern)
        self.stats.subscriptions.add(sub)
        self._handler = self.stats.handler
        self._lag = self.stats.lag
        self._every = 1
        self.skip = 0
        self._window_start = 0.0
        self._window_count = 0
        self._start = 0.0
        self._weight = 1
        self.tracing: Tracing | None = observer.tracing

    def start_timing(self, msg: Message) -> None:
        """Called for the sampled deliveries only (and every retry): no call per message in
        steady state."""
        start = self._start = time()
        self._weight = self._sampled(msg, start)

    def stop_timing(self) -> None:
        self._handler.observe(time() - self._start, self._weight)
        self._weight = 1  # a retry timed next stands for itself

    def _sampled(self, msg: Message, now: float) -> int:
        """A timed delivery: its lag, and the choice of how many to skip until the next.
        Returns the weight of this delivery's observations."""
        if msg.attempt > 1:
            return 1  # a retry: its own observation, no lag, no resampling
        weight = every = self._every
        stamp = msg.timestamp
        if stamp > 0.0:
            self._lag.observe(now - stamp, every)
        self._window_count += every
        elapsed = now - self._window_start
        if elapsed >= 1.0 or self._window_count >= 4 * MAX_SAMPLE_EVERY:
            rate = self._window_count / elapsed if elapsed > 0.0 else float("inf")
            every = 1
            while every < MAX_SAMPLE_EVERY and rate / every > SAMPLE_RATE:
                every *= 2
            self._every = every
            self._window_start = now
            self._window_count = 0
        self.skip = self._every - 1
        return weight

    def start_span(self, msg: Message) -> object:
        tracing = self.tracing
        assert tracing is not None  # the bus calls this only while tracing is set
        return tracing.start_process(msg, self._sub, self._observer.broker)

    def end_span(self, token: object) -> None:
        span: Span
        context_token: object
        span, context_token = token  # type: ignore[misc]  # the pair start_span returned
        if self.tracing is not None:
            self.tracing.detach(context_token)
        span.end()

    def attempt_failed(self, msg: Message, exc: BaseException) -> None:
        self.stats.failed += 1
        if self.tracing is not None:
            self.tracing.current_span().record_exception(exc, {"amb.attempt": msg.attempt})

    def retrying(self, msg: Message, delay: float) -> None:
        self.stats.retried += 1
        if self.tracing is not None:
            self.tracing.current_span().add_event(
                "retry", {"amb.attempt": msg.attempt, "amb.retry.delay": delay}
            )

    def expired(self, msg: Message) -> None:
        self.stats.expired += 1

    def dead_lettered(self, msg: Message, destination: str) -> None:
        self.stats.dead_lettered += 1
        if self.tracing is not None:
            span = self.tracing.current_span()
            span.set_attribute("amb.dead_letter.destination", destination)
            self.tracing.mark_error(span, f"dead-lettered after {msg.attempt} attempt(s)")


def observer_for(bus: ObservedBus, observer: bool | None) -> BusObserver | None:
    """The bus's observer: None (off) for ``observer=False``, or for ``None`` when the
    settings say off (no observability library installed, ``AMB_OBSERVABILITY=0``, or
    ``configure(bus_metrics=False)``)."""
    if observer is False:
        return None
    if observer is None and not settings.bus_metrics_enabled():
        return None
    return BusObserver(bus)

"""``metrics``: counters, gauges, histograms and ``@metrics.track`` for your own code.

Each name becomes a Prometheus metric in the configured registry (prometheus-client installed)
and an OpenTelemetry instrument (when ``configure(meter_provider=...)`` gave a meter provider),
created on first use. With neither, every call is a cheap no-op: nothing is recorded and nothing
raises, so instrumented code runs unchanged where the ``observability`` extra is not installed.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any, TypeVar

from amb_core.observability._config import Settings, settings

F = TypeVar("F", bound=Callable[..., Any])
Labels = Mapping[str, str] | None

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def prometheus_name(name: str) -> str:
    """``message.processing`` -> ``message_processing`` (Prometheus allows ``[a-zA-Z0-9_:]``)."""
    cleaned = _INVALID.sub("_", name)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned


class _Instrument:
    """One named metric in each backend in use."""

    __slots__ = ("gauge_values", "kind", "label_names", "otel", "prom")

    def __init__(self, kind: str, label_names: tuple[str, ...], prom: Any, otel: Any) -> None:
        self.kind = kind
        self.label_names = label_names
        self.prom = prom
        self.otel = otel
        self.gauge_values: dict[tuple[tuple[str, str], ...], tuple[float, dict[str, str]]] = {}

    def record(self, value: float, labels: Labels) -> None:
        names = tuple(sorted(labels)) if labels else ()
        if names != self.label_names:
            raise ValueError(
                f"metric {self.kind} used with labels {list(names)}, first used with "
                f"{list(self.label_names)}; a metric keeps one set of label names"
            )
        prom = self.prom
        if prom is not None:
            child = prom.labels(**labels) if labels else prom
            if self.kind == "counter":
                child.inc(value)
            elif self.kind == "gauge":
                child.set(value)
            else:
                child.observe(value)
        otel = self.otel
        if otel is not None:
            attributes = dict(labels) if labels else {}
            if self.kind == "counter":
                otel.add(value, attributes)
            elif self.kind == "histogram":
                otel.record(value, attributes)
            elif otel is True:  # an observable gauge reads gauge_values
                self.gauge_values[tuple(attributes.items())] = (value, attributes)
            else:
                otel.set(value, attributes)


class Metrics:
    """The ``metrics`` object. Names are yours; label names are fixed by a metric's first use.

    >>> metrics.counter("orders_received", labels={"region": "eu"})
    >>> metrics.gauge("queue_depth", 17)
    >>> metrics.histogram("payload_bytes", 2048)
    """

    def __init__(self, config: Settings | None = None) -> None:
        self._config = config or settings
        self._instruments: dict[tuple[str, str], _Instrument | None] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Metrics enabled={self.enabled}>"

    @property
    def enabled(self) -> bool:
        """True when a backend records: prometheus-client installed, or a meter provider set."""
        return self._config.prometheus_registry() is not None or (
            self._config.meter_provider is not None
        )

    def reset(self) -> None:
        """Forget the instruments made so far (after ``configure`` changed the backends)."""
        with self._lock:
            self._instruments.clear()

    # --- recording ---------------------------------------------------------------------------

    def counter(
        self, name: str, amount: float = 1.0, *, labels: Labels = None, description: str = ""
    ) -> None:
        """Add ``amount`` (default 1) to counter ``name`` (exposed as ``<name>_total``)."""
        instrument = self._get("counter", name, labels, description, None)
        if instrument is not None:
            instrument.record(amount, labels)

    def gauge(
        self, name: str, value: float, *, labels: Labels = None, description: str = ""
    ) -> None:
        """Set gauge ``name`` to ``value``."""
        instrument = self._get("gauge", name, labels, description, None)
        if instrument is not None:
            instrument.record(value, labels)

    def histogram(
        self,
        name: str,
        value: float,
        *,
        labels: Labels = None,
        description: str = "",
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        """Observe ``value`` in histogram ``name`` (``buckets`` apply at first use)."""
        instrument = self._get("histogram", name, labels, description, buckets)
        if instrument is not None:
            instrument.record(value, labels)

    def track(self, name: str, *, labels: Labels = None) -> Callable[[F], F]:
        """Decorator: counts calls (``<name>_calls_total``), errors (``<name>_errors_total``,
        calls that raised an Exception) and observes durations (``<name>_duration_seconds``).

        Works on async and sync functions; the wrapper keeps the function's name, docstring and
        signature (``functools.wraps``), and an async function stays a coroutine function.
        """
        calls, errors, duration = f"{name}_calls", f"{name}_errors", f"{name}_duration_seconds"

        def finish(start: float, failed: bool) -> None:
            self.counter(calls, labels=labels, description=f"Calls of {name}.")
            if failed:
                self.counter(errors, labels=labels, description=f"Calls of {name} that raised.")
            self.histogram(duration, perf_counter() - start, labels=labels,
                           description=f"Duration of {name}.")

        def decorate(func: F) -> F:
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def tracked_async(*args: Any, **kwargs: Any) -> Any:
                    start = perf_counter()
                    failed = False
                    try:
                        return await func(*args, **kwargs)
                    except Exception:
                        failed = True
                        raise
                    finally:
                        finish(start, failed)

                return tracked_async  # type: ignore[return-value]

            @functools.wraps(func)
            def tracked(*args: Any, **kwargs: Any) -> Any:
                start = perf_counter()
                failed = False
                try:
                    return func(*args, **kwargs)
                except Exception:
                    failed = True
                    raise
                finally:
                    finish(start, failed)

            return tracked  # type: ignore[return-value]

        return decorate

    # --- instruments -------------------------------------------------------------------------

    def _get(
        self,
        kind: str,
        name: str,
        labels: Labels,
        description: str,
        buckets: tuple[float, ...] | None,
    ) -> _Instrument | None:
        key = (kind, name)
        try:
            return self._instruments[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._instruments:
                self._instruments[key] = self._create(kind, name, labels, description, buckets)
            return self._instruments[key]

    def _create(
        self,
        kind: str,
        name: str,
        labels: Labels,
        description: str,
        buckets: tuple[float, ...] | None,
    ) -> _Instrument | None:
        label_names = tuple(sorted(labels)) if labels else ()
        doc = description or f"{name} (amb_core.observability.metrics)"
        prom = None
        registry = self._config.prometheus_registry()
        if registry is not None:
            import prometheus_client

            cls = {
                "counter": prometheus_client.Counter,
                "gauge": prometheus_client.Gauge,
                "histogram": prometheus_client.Histogram,
            }[kind]
            options: dict[str, Any] = {"registry": registry}
            if buckets is not None:
                options["buckets"] = buckets
            prom = cls(prometheus_name(name), doc, label_names, **options)
        otel: Any = None
        provider = self._config.meter_provider
        if provider is not None:
            meter = provider.get_meter("amb_core.observability")
            if kind == "counter":
                otel = meter.create_counter(name, description=doc)
            elif kind == "histogram":
                otel = meter.create_histogram(name, description=doc)
            elif hasattr(meter, "create_gauge"):
                otel = meter.create_gauge(name, description=doc)
            else:  # opentelemetry-api before 1.23: an observable gauge of the last values
                otel = True
        if prom is None and otel is None:
            return None
        instrument = _Instrument(kind, label_names, prom, otel)
        if otel is True:
            from opentelemetry.metrics import CallbackOptions, Observation

            def read(options: CallbackOptions) -> list[Observation]:
                return [Observation(v, a) for v, a in list(instrument.gauge_values.values())]

            meter.create_observable_gauge(name, [read], description=doc)
        return instrument


metrics = Metrics()

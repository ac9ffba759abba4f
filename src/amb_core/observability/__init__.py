"""Metrics, tracing and structured logs for amb-core (``pip install 'amb-core[observability]'``).

- ``metrics``: ``@metrics.track(name)``, ``metrics.counter/gauge/histogram`` for your own code;
  cheap no-ops when neither prometheus-client nor an OpenTelemetry meter provider is there.
- Built-in bus metrics, on by default for every bus once the extra is installed (turn off with
  ``AgentMessageBus(observer=False)``, ``configure(bus_metrics=False)`` or the environment
  variable ``AMB_OBSERVABILITY=0``); see docs/observability.md for the list.
- :func:`serve_metrics` serves ``/metrics``; :func:`get_registry` / :func:`metrics_text` for an
  endpoint you already have.
- OpenTelemetry: spans for publish, process and request whenever a tracer provider is set
  (globally, or ``configure(tracer_provider=...)`` / ``instrument(bus, tracer_provider=...)``),
  ``traceparent`` carried in message headers; metrics through ``configure(meter_provider=...)``.
- :class:`JsonFormatter` / :func:`configure_logging` for JSON log lines with secrets masked.

Importing this package never needs the optional libraries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amb_core._optional import require
from amb_core.observability._bus import STORE, BusObserver, broker_label
from amb_core.observability._config import default_topic_label, settings
from amb_core.observability._logging import JsonFormatter, TraceContextFilter, configure_logging
from amb_core.observability._user_metrics import Metrics, metrics

if TYPE_CHECKING:
    from amb_core.hooks import ObservedBus


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET = _Unset.UNSET


def configure(
    *,
    bus_metrics: bool | _Unset | None = UNSET,
    registry: Any = UNSET,
    tracer_provider: Any = UNSET,
    meter_provider: Any = UNSET,
    topic_label: Any = UNSET,
    max_topic_labels: int | _Unset = UNSET,
) -> None:
    """Process-wide settings; call it at startup, before creating buses. Only the arguments
    given change.

    ``bus_metrics``: None (default) = on when the extra is installed; False/True to force.
    ``registry``: a prometheus_client ``CollectorRegistry`` (default: its ``REGISTRY``).
    ``tracer_provider``: an OpenTelemetry TracerProvider (default: the global one once set).
    ``meter_provider``: an OpenTelemetry MeterProvider to export bus and user metrics to.
    ``topic_label``: ``(topic) -> label`` for published topics (default
    :func:`default_topic_label`, the first two segments); ``max_topic_labels`` caps them.
    """
    with settings.lock:
        if bus_metrics is not UNSET:
            settings.bus_metrics = bus_metrics
        if registry is not UNSET:
            settings.registry = registry
            metrics.reset()
        if tracer_provider is not UNSET:
            settings.tracer_provider = tracer_provider
        if meter_provider is not UNSET:
            settings.meter_provider = meter_provider
            metrics.reset()
        if topic_label is not UNSET:
            settings.topic_label = topic_label
        if max_topic_labels is not UNSET:
            settings.max_topic_labels = max_topic_labels
    if meter_provider is not UNSET and meter_provider is not None:
        STORE.enable_opentelemetry(meter_provider)


def instrument(bus: ObservedBus, *, tracer_provider: Any = None) -> BusObserver:
    """Attach an observer to ``bus`` (also when it was created with ``observer=False``, or to
    use ``tracer_provider`` for this bus only). Subscriptions already made are covered too."""
    observer = BusObserver(bus, tracer_provider=tracer_provider)
    bus.attach_observer(observer)
    return observer


def get_registry() -> Any:
    """The prometheus_client registry holding amb-core's metrics, for an endpoint you already
    serve. Raises :class:`amb_core.errors.MissingDependency` without prometheus-client."""
    require("prometheus_client", "observability")
    registry = settings.prometheus_registry()
    STORE.register(registry)
    return registry


def metrics_text() -> bytes:
    """The Prometheus text exposition of :func:`get_registry` (for a web framework's route)."""
    prometheus_client = require("prometheus_client", "observability")
    data: bytes = prometheus_client.generate_latest(get_registry())
    return data


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); ``close()`` stops it."""

    host: str
    port: int
    _server: Any
    _thread: Any

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(
    port: int = 9464, addr: str = "0.0.0.0", *, registry: Any = None
) -> MetricsServer:
    """Serve ``/metrics`` for Prometheus on ``addr:port`` (``port=0``: any free port; see
    ``.port``) from a daemon thread, as ``prometheus_client.start_http_server`` does.
    ``addr="127.0.0.1"`` keeps it local. Raises MissingDependency without prometheus-client."""
    prometheus_client = require("prometheus_client", "observability")
    registry = registry if registry is not None else get_registry()
    STORE.register(registry)
    server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(addr, server.server_port, server, thread)


__all__ = [
    "BusObserver",
    "JsonFormatter",
    "Metrics",
    "MetricsServer",
    "TraceContextFilter",
    "broker_label",
    "configure",
    "configure_logging",
    "default_topic_label",
    "get_registry",
    "instrument",
    "metrics",
    "metrics_text",
    "serve_metrics",
    "settings",
]

"""Process-wide observability settings, and which optional libraries are importable.

Nothing here imports prometheus-client or opentelemetry at module import: they are looked up
(once, cached) when first needed, so ``import amb_core.observability`` never fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

TopicLabel = Callable[[str], str]

DISABLE_ENV = "AMB_OBSERVABILITY"
"""``AMB_OBSERVABILITY=0`` (or ``off``/``false``) turns the built-in bus metrics and tracing off
for buses created without an explicit ``observer``."""

INBOX_LABEL = "_amb.inbox.*"
NATS_INBOX_LABEL = "_INBOX.*"
REPLY_LABEL = "_reply"


@cache
def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked once; no import happens here)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def prometheus_available() -> bool:
    return available("prometheus_client")


def opentelemetry_available() -> bool:
    return available("opentelemetry") and available("opentelemetry.trace")


def default_topic_label(topic: str, segments: int = 2) -> str:
    """The bounded label a *published* topic is counted under.

    The first ``segments`` dot-separated segments; deeper ones collapse into ``>``:
    ``orders.created`` stays, ``orders.created.eu.42`` becomes ``orders.created.>``. Reply inboxes
    (``_amb.inbox.<bus id>``, NATS ``_INBOX.<id>``) become one label each. Subscriptions are
    labelled by their pattern instead, which is already bounded.
    """
    if topic.startswith("_amb.inbox."):
        return INBOX_LABEL
    if topic.startswith("_INBOX."):
        return NATS_INBOX_LABEL
    parts = topic.split(".", segments)
    if len(parts) <= segments:
        return topic
    return ".".join(parts[:segments]) + ".>"


@dataclass
class Settings:
    """What :func:`amb_core.observability.configure` sets. Read when a bus is created."""

    bus_metrics: bool | None = None
    """None: on when prometheus-client or opentelemetry-api is installed (and the environment
    variable ``AMB_OBSERVABILITY`` is not ``0``); True/False to force."""
    registry: Any = None
    """The prometheus_client CollectorRegistry; None means ``prometheus_client.REGISTRY``."""
    tracer_provider: Any = None
    """OpenTelemetry TracerProvider; None means the global one, once an SDK has set it."""
    meter_provider: Any = None
    """OpenTelemetry MeterProvider to export metrics to; None means no OpenTelemetry metrics."""
    topic_label: TopicLabel = default_topic_label
    max_topic_labels: int = 1000
    """Distinct publish labels per broker before further ones are counted as ``_other``."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bus_metrics_enabled(self) -> bool:
        if self.bus_metrics is not None:
            return self.bus_metrics
        if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
            return False
        return prometheus_available() or opentelemetry_available()

    def prometheus_registry(self) -> Any:
        """The registry in use (imports prometheus_client), or None when it is not installed."""
        if self.registry is not None:
            return self.registry
        if not prometheus_available():
            return None
        prometheus_client = importlib.import_module("prometheus_client")
        return prometheus_client.REGISTRY


settings = Settings()

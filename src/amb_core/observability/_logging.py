"""Structured logs through the standard ``logging`` module.

amb-core logs with ``logging.getLogger(__name__)`` (``amb_core.bus``, ``amb_core.adapters.redis``
...) and never prints. :class:`JsonFormatter` renders a record as one JSON object (with the
``extra={...}`` fields and, when a span is active, its trace and span ids) and masks passwords in
URLs; :func:`configure_logging` installs it on the ``amb_core`` logger.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

from amb_core.broker import mask_url
from amb_core.observability import _config

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return mask_url(str(value))


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the active OpenTelemetry span to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _config.opentelemetry_available():
            from opentelemetry import trace

            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_id = format(context.trace_id, "032x")
                record.span_id = format(context.span_id, "016x")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, every extra
    field, and ``exception`` when there is one. ``user:password@`` in URLs becomes
    ``user:***@`` everywhere."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_url(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = _masked(value)
        if record.exc_info:
            data["exception"] = mask_url(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exception"] = mask_url(record.exc_text)
        if record.stack_info:
            data["stack"] = record.stack_info
        return orjson.dumps(data, default=str).decode()


def configure_logging(
    level: int | str = logging.INFO, *, stream: TextIO | None = None, logger: str = "amb_core"
) -> logging.Handler:
    """Send ``logger``'s records (default: all of amb-core's) as JSON lines to ``stream``
    (default stderr). Returns the handler, so you can remove it again."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    target = logging.getLogger(logger)
    target.addHandler(handler)
    target.setLevel(level)
    return handler

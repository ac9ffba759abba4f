"""The Message users publish and receive."""

from __future__ import annotations

import builtins
import itertools
import os
from dataclasses import dataclass, field, fields
from time import time_ns
from typing import Any, TypeVar

T = TypeVar("T")


def _new_prefix() -> str:
    return os.urandom(8).hex()


_id_prefix = _new_prefix()
_id_counter = itertools.count(1)


def _reset_ids_after_fork() -> None:
    global _id_prefix, _id_counter
    _id_prefix = _new_prefix()
    _id_counter = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_ids_after_fork)


def new_id() -> str:
    """A unique id: 64 random bits per process (16 hex digits), then a counter in hex.

    Cheaper than uuid4 (a hot-path cost on every publish) and just as unique in practice; the
    counter is not zero-padded because padding triples the cost of the formatting.
    """
    return f"{_id_prefix}{next(_id_counter):x}"


def _now() -> float:
    # Whole microseconds, so the timestamp survives the RFC 3339 `time` attribute exactly
    # (and cheaper than round(time.time(), 6)).
    return time_ns() // 1000 / 1_000_000


@dataclass(slots=True, eq=True)
class Message:
    """One message: what you publish, and what a handler receives.

    ``payload`` is any JSON-able value, a pydantic model (sent as its JSON form, received as a
    dict), or ``bytes`` (passed through untouched). ``headers`` are string pairs that travel
    with the message. ``attempt`` counts deliveries of this message to a handler (1 on the first);
    a retried message keeps its ``id``. ``position`` is the broker's log position (stream id,
    sequence, offset) where the broker has one, else None. ``key`` is an ordering key: brokers
    that declare ``Capabilities.ordering_keys`` keep messages with the same key in order across
    a consumer group (Kafka's record key; the CloudEvents ``partitionkey`` attribute on the wire).
    """

    topic: str
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    id: str = field(default_factory=new_id)
    timestamp: float = field(default_factory=_now)
    causation_id: str | None = None
    attempt: int = 1
    source: str = "amb-core"
    type: str = "amb.message"
    position: int | str | None = field(default=None, compare=False)
    key: str | None = None

    def copy(self, **changes: Any) -> Message:
        """A shallow copy with some fields changed (headers copied, so the copy can add to them)."""
        # Field by field rather than dataclasses.replace: this is on every request's path.
        clone = Message(
            self.topic, self.payload, dict(self.headers), self.correlation_id, self.reply_to,
            self.id, self.timestamp, self.causation_id, self.attempt, self.source, self.type,
            self.position, self.key,
        )
        if changes:
            unknown = changes.keys() - _FIELD_NAMES
            if unknown:
                raise TypeError(f"Message has no field(s) {sorted(unknown)}")
            for name, value in changes.items():
                setattr(clone, name, value)
        return clone

    def payload_as(self, model: builtins.type[T]) -> T:
        """The payload validated into a pydantic model (or any class with ``model_validate``)."""
        validate = getattr(model, "model_validate", None)
        if validate is None:
            raise TypeError(f"{model!r} has no model_validate(); pass a pydantic model class")
        result: T = validate(self.payload)
        return result


_FIELD_NAMES = frozenset(f.name for f in fields(Message))

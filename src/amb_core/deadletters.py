"""What operators see of a dead letter: the message and why it died."""

from __future__ import annotations

from dataclasses import dataclass

from amb_core.message import Message
from amb_core.retry import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    ERROR_MESSAGE,
    ERROR_TYPE,
    ORIGINAL_TOPIC,
)

DEAD_LETTER_HEADERS = (ERROR_TYPE, ERROR_MESSAGE, ATTEMPTS, ORIGINAL_TOPIC, DEAD_LETTERED_AT)


@dataclass(frozen=True)
class DeadLetter:
    """One letter at a dead-letter destination (see :meth:`AgentMessageBus.dead_letters`).

    ``position`` names it at the broker (a stream id, a sequence), None where the broker keeps
    none. A message that reached the destination some other way (published there by hand)
    has empty error fields and ``attempts`` 0.
    """

    message: Message
    original_topic: str
    error_type: str
    error_message: str
    attempts: int
    dead_lettered_at: float | None
    position: int | str | None

    @classmethod
    def from_message(cls, msg: Message) -> DeadLetter:
        headers = msg.headers
        try:
            attempts = int(headers.get(ATTEMPTS, "0"))
        except ValueError:
            attempts = 0
        try:
            at: float | None = float(headers[DEAD_LETTERED_AT])
        except (KeyError, ValueError):
            at = None
        return cls(
            message=msg,
            original_topic=headers.get(ORIGINAL_TOPIC, ""),
            error_type=headers.get(ERROR_TYPE, ""),
            error_message=headers.get(ERROR_MESSAGE, ""),
            attempts=attempts,
            dead_lettered_at=at,
            position=msg.position,
        )

    def redriven(self) -> Message:
        """The message to publish back to its original topic: a new id (a broker that drops
        duplicate ids must not drop it), caused by the dead letter's, a fresh attempt count,
        and without the dead-letter headers."""
        msg = self.message
        headers = {k: v for k, v in msg.headers.items() if k not in DEAD_LETTER_HEADERS}
        return Message(
            topic=self.original_topic, payload=msg.payload, headers=headers,
            correlation_id=msg.correlation_id, causation_id=msg.id, source=msg.source,
            type=msg.type,
        )


@dataclass(frozen=True)
class Redrive:
    """What :meth:`AgentMessageBus.redrive_dead_letters` did: ``redriven`` letters published
    back to their original topics, ``removed`` of them taken off the destination; ``kept``
    says why the others stay there (a broker that cannot remove single messages), else None."""

    redriven: int
    removed: int
    kept: str | None = None

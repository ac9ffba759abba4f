"""What a conversation between agents carries: the message being handled, its deadline, and
the headers of streamed replies, cancellation and budgets.

While a handler runs, :func:`current_message` is the message it handles and :func:`remaining`
how many seconds its caller's budget has left (None without one). The bus uses both: a message
published, requested or streamed from inside a handler gets ``causation_id`` = the handled
message's id and its ``correlation_id`` (the conversation) unless the caller set them, and a
request, stream or gather made there waits at most for what is left of the budget.

Budgets travel as a relative ``amb-timeout`` (seconds left when sent, as gRPC's
``grpc-timeout``), so clock skew between machines cannot shorten or stretch them; the receiver
counts from when it took the message. ``amb-expires`` (the sender's clock, Unix seconds) only
decides that a message which waited in a queue past its deadline is not handled at all, with
:data:`EXPIRY_TOLERANCE` seconds allowed for clocks that disagree.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amb_core.message import Message

TIMEOUT = "amb-timeout"
"""Seconds of budget left when the request was sent (relative: immune to clock skew)."""
EXPIRES = "amb-expires"
"""The sender's deadline, Unix seconds: a message still queued past it is not handled."""
STREAM = "amb-stream"
"""On a request: the caller reads a stream of replies (``bus.stream``)."""
GATHER = "amb-gather"
"""On a request: the caller gathers replies from every responder (``bus.gather``)."""
REPLY = "amb-reply"
"""On a reply: ``chunk`` (one of a stream), ``end`` (the stream is over), ``error`` (the
handler raised: ``amb-error-type`` and ``amb-error-message`` say what)."""
SEQ = "amb-seq"
"""On a stream's replies: 0, 1, 2 ... so the caller restores their order."""
CONTROL_TO = "amb-control-to"
"""On a stream's replies: where the responder takes a cancellation."""
CONTROL = "amb-control"
"""On a message to a responder's inbox: ``cancel`` (the caller stopped reading)."""
EXPIRY_TOLERANCE = 1.0
"""Seconds a message may look expired by the receiver's clock and still be handled."""

_HANDLING: ContextVar[tuple[Message, float | None] | None] = ContextVar(
    "amb_handling", default=None
)


def current_message() -> Message | None:
    """The message the running handler handles (None outside a handler)."""
    handling = _HANDLING.get()
    return None if handling is None else handling[0]


def remaining() -> float | None:
    """Seconds left of the running handler's budget: None when its caller set none (or outside
    a handler), 0.0 once it is spent."""
    handling = _HANDLING.get()
    if handling is None or handling[1] is None:
        return None
    return max(handling[1] - time.monotonic(), 0.0)


@dataclass
class Turn:
    """One message of a conversation and the messages it caused (see :func:`conversation_tree`)."""

    message: Message
    caused: list[Turn] = field(default_factory=list)

    def lines(self, depth: int = 0) -> list[str]:
        """The tree as indented lines: topic, id, and what caused what."""
        msg = self.message
        own = [f"{'  ' * depth}{msg.topic}  {msg.id}"]
        return own + [line for turn in self.caused for line in turn.lines(depth + 1)]


def conversation_tree(messages: Iterable[Message], correlation_id: str) -> list[Turn]:
    """The messages of one conversation (``correlation_id``) as trees by ``causation_id``,
    in the order given (a replay's is the broker's). A message whose cause is not among them
    is a root."""
    turns = {m.id: Turn(m) for m in messages if m.correlation_id == correlation_id}
    roots: list[Turn] = []
    for turn in turns.values():
        cause = turns.get(turn.message.causation_id or "")
        if cause is None or cause is turn:
            roots.append(turn)
        else:
            cause.caused.append(turn)
    return roots

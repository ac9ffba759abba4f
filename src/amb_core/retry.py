"""Retry policy and the dead-letter headers."""

from __future__ import annotations

import random
from dataclasses import dataclass

ERROR_TYPE = "amb-error-type"
ERROR_MESSAGE = "amb-error-message"
ATTEMPTS = "amb-attempts"
ORIGINAL_TOPIC = "amb-original-topic"
DEAD_LETTERED_AT = "amb-dead-lettered-at"
"""When the bus dead-lettered the message: Unix seconds, as text."""
MAX_ERROR_TEXT = 2000


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing handler is tried, and how long to wait in between.

    ``max_attempts`` counts every try, the first included (1 means no retry). The wait before
    attempt n+1 is ``initial_delay * backoff ** (n - 1)``, capped at ``max_delay``, with up to
    ``jitter`` (a fraction) of random spread. After the last attempt the message is dead-lettered.
    """

    max_attempts: int = 3
    initial_delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.backoff < 1 or self.jitter < 0:
            raise ValueError("delays must be >= 0, backoff >= 1 and jitter >= 0")

    def delay_before(self, next_attempt: int) -> float:
        """Seconds to wait before try number ``next_attempt`` (2 for the first retry)."""
        delay = min(self.initial_delay * self.backoff ** max(next_attempt - 2, 0), self.max_delay)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(delay, 0.0)


"""Names and rules on Service Bus: subscription names from groups and patterns, and the rule
(filter) that makes a subscription see exactly the amb topics of its pattern.

Every amb message carries its topic in the application property :data:`TOPIC_PROPERTY`.

- An exact pattern gets a **correlation filter** on that property (the cheapest filter the
  service evaluates).
- A wildcard pattern gets a **SQL filter** with ``LIKE``: ``*`` and ``>`` become ``%``, and
  ``%``, ``_`` and the escape character in the literal segments are escaped (``ESCAPE '!'``),
  quotes doubled. ``%`` also matches dots, so ``LIKE`` alone is wider than ``*``; for patterns
  without ``>`` one ``NOT LIKE`` bounds the number of segments, which makes the rule exact
  (``events.user.*`` does not match ``events.user.a.b``). A pattern with both ``*`` and ``>``
  cannot be bounded that way: its rule is a superset and the subscription filters on receipt
  (:func:`amb_core.topics.matches`), as every subscription does for what a rule let through
  while it was being created.

Subscription and rule names are at most 50 characters of letters, digits, ``.``, ``-``, ``_``
(starting and ending with a letter or digit): a readable head and a digest of the exact
(group, pattern) or topic, so two patterns never share a subscription.
"""

from __future__ import annotations

import hashlib
import re
import uuid

TOPIC_PROPERTY = "amb_topic"
"""The application property carrying the amb topic of every message."""
RULE_NAME = "amb"
DEFAULT_RULE = "$Default"
MAX_NAME = 50
ESCAPE = "!"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_VALID_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,48}[A-Za-z0-9])?$")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _name(kind: str, readable: str, digest: str) -> str:
    head = _NAME_CHARS.sub("-", readable).strip("-._")
    room = MAX_NAME - len(kind) - 1 - 1 - 16  # kind '-' head '-' 16 hex digits
    head = head[:room].rstrip("-._")
    name = f"{kind}-{head}-{digest[:16]}" if head else f"{kind}-{digest[:16]}"
    assert _VALID_NAME.match(name), name
    return name


def group_subscription_name(group: str, pattern: str) -> str:
    """The durable subscription of consumer group ``group`` on ``pattern``."""
    return _name("g", group, _digest("group", group, pattern))


def keeper_subscription_name(topic: str) -> str:
    """The durable subscription keeping the letters of dead-letter topic ``topic``."""
    return _name("dl", topic.rsplit(".", 1)[-1], _digest("keeper", topic))


def plain_subscription_name() -> str:
    """A plain subscriber's own subscription (deleted on unsubscribe, or by the service once
    idle)."""
    return f"p-{uuid.uuid4().hex}"


def valid_name(name: str) -> bool:
    return bool(_VALID_NAME.match(name))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _like_literal(segment: str) -> str:
    return (segment.replace(ESCAPE, ESCAPE + ESCAPE).replace("%", ESCAPE + "%")
            .replace("_", ESCAPE + "_"))


def like_pattern(pattern: str) -> str:
    """The ``LIKE`` pattern of an amb pattern (``*`` and ``>`` as ``%``, literals escaped)."""
    return ".".join("%" if segment in ("*", ">") else _like_literal(segment)
                    for segment in pattern.split("."))


def sql_filter(pattern: str) -> str:
    """The SQL filter expression of a wildcard pattern (see the module docstring)."""
    segments = pattern.split(".")
    like = (f"{TOPIC_PROPERTY} LIKE {_quote(like_pattern(pattern))} "
            f"ESCAPE {_quote(ESCAPE)}")
    if segments[-1] == ">":
        return like
    # Exactly len(segments) segments: fewer than len(segments) dots ... + the LIKE's minimum.
    too_many = ".".join(["%"] * (len(segments) + 1))
    return f"{like} AND {TOPIC_PROPERTY} NOT LIKE {_quote(too_many)}"


def exact_by_rule(pattern: str) -> bool:
    """Whether the rule of ``pattern`` lets through exactly its topics (see above)."""
    segments = pattern.split(".")
    return not ("*" in segments and segments[-1] == ">")

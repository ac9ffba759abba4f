"""Topic validation and wildcard matching.

A topic is a dot-separated list of non-empty segments without whitespace, at most
``MAX_TOPIC_LENGTH`` characters. A subscription pattern may use ``*`` as a whole segment
(exactly one segment) and ``>`` as the last segment (one or more trailing segments), as in NATS.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_TOPIC_LENGTH = 255
_WHITESPACE = re.compile(r"\s")


def _check_common(topic: object, kind: str) -> list[str]:
    if not isinstance(topic, str):
        raise TypeError(f"{kind} must be a str, not {type(topic).__name__}")
    if not topic or not topic.strip():
        raise ValueError(f"{kind} must not be empty or blank")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ValueError(f"{kind} is {len(topic)} characters long; the limit is {MAX_TOPIC_LENGTH}")
    if _WHITESPACE.search(topic):
        raise ValueError(f"{kind} {topic!r} contains whitespace")
    segments = topic.split(".")
    if "" in segments:
        raise ValueError(f"{kind} {topic!r} has an empty segment (leading, trailing or double dot)")
    return segments


@lru_cache(maxsize=4096)
def validate_topic(topic: str) -> str:
    """Check a concrete topic (publish, request, replay). Raises ValueError; returns the topic."""
    for segment in _check_common(topic, "topic"):
        if "*" in segment or ">" in segment:
            raise ValueError(
                f"topic {topic!r} contains a wildcard; wildcards are for subscribe patterns only"
            )
    return topic


@lru_cache(maxsize=1024)
def validate_pattern(pattern: str) -> str:
    """Check a subscription pattern. Raises ValueError; returns the pattern."""
    segments = _check_common(pattern, "pattern")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == ">" and index != last:
            raise ValueError(f"pattern {pattern!r}: '>' is only allowed as the last segment")
        if segment not in ("*", ">") and ("*" in segment or ">" in segment):
            raise ValueError(
                f"pattern {pattern!r}: wildcards must be whole segments ('a.*', not 'a*')"
            )
    return pattern


def is_wildcard(pattern: str) -> bool:
    return "*" in pattern or ">" in pattern


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def matches(pattern: str, topic: str) -> bool:
    """True if ``topic`` matches ``pattern`` (``*`` one segment, ``>`` one or more trailing)."""
    if pattern == topic:
        return True
    wanted = _compiled(pattern)
    parts = topic.split(".")
    for index, segment in enumerate(wanted):
        if segment == ">":
            return len(parts) > index
        if index >= len(parts):
            return False
        if segment != "*" and segment != parts[index]:
            return False
    return len(parts) == len(wanted)

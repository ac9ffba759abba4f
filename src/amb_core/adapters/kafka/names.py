"""amb topics <-> Kafka topic names, and wildcard patterns -> Kafka regex subscriptions.

Kafka topic names allow only ``[a-zA-Z0-9._-]``, at most 249 characters, and not ``.`` or
``..``. An amb topic made of those characters only is its own Kafka name (so existing topics
are addressed as they are). Any other character is written as its UTF-8 bytes, each as ``__``
and two lowercase hex digits: ``événements`` -> ``__c3__a9v__c3__a9nements``. So that the
mapping reads back unambiguously, an amb topic that itself contains ``__`` followed by two
hex digits is refused, as is one whose Kafka name would be longer than 249 characters.

Segments stay segments: ``.`` is never escaped, so ``*`` maps to ``[^.]+`` and ``>`` to
``.+`` in the regex, and segment-exact matching is checked again on receipt.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_KAFKA_TOPIC = 249
_PLAIN = re.compile(r"[A-Za-z0-9._-]*")
_RESERVED = re.compile(r"__[0-9a-f]{2}")
_ESCAPED = re.compile(r"(?:__[0-9a-f]{2})+")
_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@lru_cache(maxsize=8192)
def kafka_topic(topic: str) -> str:
    """The Kafka name of amb topic ``topic``; ValueError when it cannot map."""
    if _RESERVED.search(topic):
        raise ValueError(
            f"topic {topic!r} contains '__' followed by two hex digits, which the Kafka "
            "adapter reserves for escaping other characters"
        )
    if _PLAIN.fullmatch(topic):
        name = topic
    else:
        name = "".join(
            char if char in _KEEP else "".join(f"__{b:02x}" for b in char.encode("utf-8"))
            for char in topic
        )
    if len(name) > MAX_KAFKA_TOPIC:
        raise ValueError(
            f"topic {topic!r} maps to a Kafka topic name of {len(name)} characters; Kafka "
            f"allows at most {MAX_KAFKA_TOPIC} (characters outside [a-zA-Z0-9._-] take 4 "
            "characters per UTF-8 byte)"
        )
    if name in (".", ".."):
        raise ValueError(f"Kafka has no topic named {name!r}")
    return name


@lru_cache(maxsize=8192)
def amb_topic(name: str) -> str:
    """The amb topic of Kafka topic ``name`` (a foreign name that does not decode stays)."""
    if "__" not in name:
        return name
    try:
        return _ESCAPED.sub(
            lambda m: bytes.fromhex(m.group(0).replace("__", "")).decode("utf-8"), name
        )
    except UnicodeDecodeError:
        return name


@lru_cache(maxsize=1024)
def kafka_regex(pattern: str) -> str:
    """The Kafka (librdkafka) regex subscription for an amb wildcard ``pattern``."""
    parts = []
    for segment in pattern.split("."):
        if segment == "*":
            parts.append("[^.]+")
        elif segment == ">":
            parts.append(".+")
        else:
            parts.append(re.escape(kafka_topic(segment)).replace("\\-", "-"))
    return "^" + "\\.".join(parts) + "$"

"""Names on the broker: binding keys from amb patterns, queue names from groups and patterns.

AMQP queue names are at most 255 bytes of ``[a-zA-Z0-9-_.:@#,/+ ]`` (pamqp refuses anything
else before it reaches the broker). amb patterns carry ``*`` and ``>``, and topics may be any
unicode, so a queue name is built from readable parts:

- a ``*`` segment is written ``_star_``, a ``>`` segment ``_tail_``;
- any other character outside ``[a-zA-Z0-9-_.:,/+]`` (``@``, ``#``, non-ASCII ...) is written
  ``@xx`` per UTF-8 byte;
- a name that needed either gets ``:`` and a digest of the exact (group, pattern) at the end,
  so ``a.*`` and a literal ``a._star_`` never share a queue;
- a name over 255 bytes keeps a readable head and the digest.

A name whose parts needed no encoding is exactly ``<prefix><group>:<pattern>`` (as before).
``#`` never comes out of the encoding, so names with it are free for the adapter's own
queues: ``<prefix>#dead-letters:<topic>`` keeps the letters of a dead-letter topic.
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME_BYTES = 255
QUEUE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:@#,/+ ]*$")
"""What pamqp accepts as a queue name (its ``queue-name`` domain)."""
_PLAIN = re.compile(r"^[a-zA-Z0-9\-_.:,/+]*$")
_STAR, _TAIL = "_star_", "_tail_"
KEEPER_MARK = "#dead-letters:"
_HEAD_BYTES = 150


def binding_key(pattern: str) -> str:
    """amb pattern -> AMQP topic binding key (``>`` is one or more segments, ``#`` zero or more)."""
    segments = pattern.split(".")
    if "#" in segments:
        raise ValueError(
            f"pattern {pattern!r}: a '#' segment would be an AMQP wildcard on RabbitMQ; "
            "use amb's '>' (one or more trailing segments)"
        )
    if segments[-1] == ">":
        segments[-1:] = ["*", "#"]
    return ".".join(segments)


def _escape(text: str) -> str:
    if _PLAIN.match(text):
        return text
    out = []
    for char in text:
        if _PLAIN.match(char):
            out.append(char)
        else:
            out.extend(f"@{byte:02x}" for byte in char.encode())
    return "".join(out)


def _encode_pattern(pattern: str) -> str:
    return ".".join(
        _STAR if segment == "*" else _TAIL if segment == ">" else _escape(segment)
        for segment in pattern.split(".")
    )


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _fit(head: str, digest: str) -> str:
    head = head[:_HEAD_BYTES]
    while len(head.encode()) > _HEAD_BYTES:
        head = head[:-1]
    return f"{head}:{digest[:24]}"


def check_prefix(prefix: str) -> str:
    if not QUEUE_NAME.match(prefix) or len(prefix.encode()) > 64:
        raise ValueError(f"queue_prefix {prefix!r}: at most 64 bytes of [a-zA-Z0-9-_.:@#,/+ ]")
    return prefix


def group_queue_name(prefix: str, group: str, pattern: str) -> str:
    """The durable queue of consumer group ``group`` on ``pattern``: readable, unique, valid."""
    raw = f"{prefix}{group}:{pattern}"
    if _PLAIN.match(group) and _PLAIN.match(pattern):
        if len(raw.encode()) <= MAX_NAME_BYTES:
            return raw
        return _fit(f"{prefix}{group}", _digest(group, pattern))
    digest = _digest(group, pattern)
    name = f"{prefix}{_escape(group)}:{_encode_pattern(pattern)}:{digest[:12]}"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    return _fit(f"{prefix}{_escape(group)}", digest)


def keeper_queue_name(prefix: str, topic: str) -> str:
    """The durable queue that keeps the letters of dead-letter topic ``topic``."""
    encoded = _escape(topic)
    name = f"{prefix}{KEEPER_MARK}{encoded}"
    if encoded != topic:
        name = f"{name}:{_digest(topic)[:12]}"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    return _fit(f"{prefix}{KEEPER_MARK}{encoded}", _digest("#dead-letters", topic))

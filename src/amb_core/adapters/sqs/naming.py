"""Names of what the adapter creates on SQS and SNS, and the SNS filter policy of a pattern.

SQS queue names are at most 80 characters of ``[A-Za-z0-9_-]`` (a FIFO queue's name ends in
``.fifo``, counted in the 80); amb topics, groups and patterns hold dots, ``*``, ``>`` and any
Unicode. So a name is the readable part (``queue_name``, a kind letter, the group and pattern
with every other character turned into ``_``), cut to fit, then a hash of the exact input so
two patterns that read the same never share a queue.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from amb_core.topics import validate_pattern

MAX_QUEUE_NAME = 80
MAX_BASE = 40
FIFO_SUFFIX = ".fifo"
TOPIC_ATTRIBUTE = "amb-topic"
"""The message attribute carrying the amb topic (SNS filter policies match on it)."""
DEPTH_ATTRIBUTE = "amb-depth"
"""The number of segments of the topic (a Number attribute): ``events.user.*`` asks depth 3,
so SNS itself keeps ``events.user.a.b`` away from it."""
ENCODING_ATTRIBUTE = "amb-body-encoding"
"""``base64`` on a message whose body is base64 text of bytes that are not valid SQS text."""
OWN_ATTRIBUTES = frozenset({TOPIC_ATTRIBUTE, DEPTH_ATTRIBUTE, ENCODING_ATTRIBUTE})

_BASE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_OTHER = re.compile(r"[^A-Za-z0-9_-]+")

KINDS = {"group": "g", "keeper": "d", "plain": "s", "inbox": "r"}


def check_base(name: str) -> str:
    if not _BASE.fullmatch(name):
        raise ValueError(
            f"queue_name {name!r} must be 1-{MAX_BASE} characters of letters, digits, '-' "
            "and '_' (it prefixes every queue and names the SNS topic)"
        )
    return name


def _readable(text: str) -> str:
    return _OTHER.sub("_", text.replace("*", "star").replace(">", "tail")).strip("_") or "_"


def queue_name(base: str, kind: str, *parts: str, fifo: bool = False) -> str:
    """``<base>-<kind letter>-<readable parts>-<hash>`` (``.fifo`` appended on FIFO)."""
    digest = hashlib.sha256("\x00".join((kind, *parts)).encode()).hexdigest()[:10]
    head = f"{base}-{KINDS[kind]}-"
    room = MAX_QUEUE_NAME - len(head) - len(digest) - 1 - (len(FIFO_SUFFIX) if fifo else 0)
    readable = "-".join(_readable(part) for part in parts)[:room].rstrip("-")
    name = f"{head}{readable}-{digest}" if readable else f"{head}{digest}"
    return name + FIFO_SUFFIX if fifo else name


def depth(topic: str) -> int:
    return topic.count(".") + 1


def filter_policy(pattern: str) -> dict[str, Any]:
    """The SNS filter policy of ``pattern`` on the topic and depth attributes.

    An exact topic matches itself. A wildcard pattern matches the prefix up to its first
    wildcard and, unless it ends in ``>``, exactly its depth (``>`` asks at least one more
    segment, which the prefix's trailing dot already implies). A ``*`` in the middle
    (``a.*.c``) is narrowed by SNS only to ``a.`` at depth 3: the subscription checks each
    message against the pattern on receipt (:func:`amb_core.topics.matches`).
    """
    validate_pattern(pattern)
    segments = pattern.split(".")
    if "*" not in segments and ">" not in segments:
        return {TOPIC_ATTRIBUTE: [pattern]}
    fixed: list[str] = []
    for segment in segments:
        if segment in ("*", ">"):
            break
        fixed.append(segment)
    prefix = ".".join(fixed) + "." if fixed else ""
    policy: dict[str, Any] = {
        TOPIC_ATTRIBUTE: [{"prefix": prefix}] if prefix else [{"exists": True}],
    }
    if segments[-1] == ">":
        if not prefix or len(segments) > len(fixed) + 1:
            policy[DEPTH_ATTRIBUTE] = [{"numeric": [">=", len(segments)]}]
    else:
        policy[DEPTH_ATTRIBUTE] = [{"numeric": ["=", len(segments)]}]
    return policy


def exact_on_sns(pattern: str) -> bool:
    """Whether SNS alone delivers exactly the topics of ``pattern`` (no check on receipt)."""
    segments = pattern.split(".")
    wild = [i for i, s in enumerate(segments) if s in ("*", ">")]
    if not wild:
        return True
    # Exact when every wildcard is at the end: 'a.b.*', 'a.b.>' (prefix + depth).
    return wild == [len(segments) - 1] and len(segments) > 1

from __future__ import annotations

import pytest

from amb_core.topics import MAX_TOPIC_LENGTH, matches, validate_pattern, validate_topic


@pytest.mark.parametrize("topic", ["a", "a.b.c", "dlq:agent-messages", "événements.用户",
                                   "x" * MAX_TOPIC_LENGTH, "_amb.inbox.1"])
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize("topic", ["", " ", "\t", "a..b", "a.", ".a", "a.*", "a.>", "*", ">",
                                   "a b", "a\nb", "x" * (MAX_TOPIC_LENGTH + 1), "a.b*"])
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        validate_topic(topic)


def test_non_string_topic_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        validate_topic(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["a.*", "a.>", "*", ">", "*.b.>", "a.*.c"])
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["", "a.>.b", "a*", "a.b>", ">.a", "a..*", "a. b"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        validate_pattern(pattern)


@pytest.mark.parametrize("pattern,topic,expected", [
    ("events.user.*", "events.user.created", True),
    ("events.user.*", "events.user.a.b", False),
    ("events.user.*", "events.order.created", False),
    ("events.user.*", "events.user", False),
    ("events.>", "events.user.created", True),
    ("events.>", "events.x", True),
    ("events.>", "events", False),
    (">", "anything.at.all", True),
    ("*", "one", True),
    ("*", "one.two", False),
    ("*.b.>", "a.b.c.d", True),
    ("*.b.>", "a.c.c.d", False),
    ("a.b", "a.b", True),
    ("a.b", "a.bc", False),
])
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected

"""The subscription index (amb_core.routing) against amb_core.topics.matches."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from amb_core.routing import SubscriptionIndex
from amb_core.topics import matches

SEGMENTS = st.sampled_from(["a", "b", "c", "events", "user"])
TOPICS = st.lists(SEGMENTS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(SEGMENTS, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        parts[-1] = ">"
    return ".".join(parts)


class Sub:
    """A value told apart by identity, as routing targets are."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __repr__(self) -> str:
        return f"Sub({self.pattern!r})"


def expected(subs: list[Sub], topic: str) -> Counter[int]:
    return Counter(id(s) for s in subs if matches(s.pattern, topic))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(patterns(), min_size=0, max_size=25),
    st.lists(TOPICS, min_size=1, max_size=15),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=15),
    st.lists(patterns(), max_size=10),
)
def test_index_matches_exactly_what_matches_says_through_adds_removes_and_cache(
    pattern_list: list[str], topics: list[str], removals: list[int], late: list[str]
) -> None:
    index: SubscriptionIndex[Sub] = SubscriptionIndex(max_cached=8)
    subs = [Sub(p) for p in pattern_list]
    for sub in subs:
        index.add(sub.pattern, sub)
    for topic in topics:  # fill the cache (and overflow it: max_cached is small)
        assert Counter(map(id, index.match(topic))) == expected(subs, topic)
    for r in removals:
        if subs:
            sub = subs.pop(r % len(subs))
            assert index.remove(sub.pattern, sub)
            assert not index.remove(sub.pattern, sub), "removed twice"
    for pattern in late:
        sub = Sub(pattern)
        subs.append(sub)
        index.add(pattern, sub)
    for topic in topics:  # cached entries were updated, not stale
        assert Counter(map(id, index.match(topic))) == expected(subs, topic), topic
        assert Counter(map(id, index._lookup(topic))) == expected(subs, topic)
    assert len(index) == len(subs)
    assert Counter(map(id, index.values())) == Counter(map(id, subs))


def test_exact_before_wildcard_and_in_the_order_added() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a.>", "tail")
    index.add("a.b", "first")
    assert index.match("a.b") == ("first", "tail")
    index.add("a.b", "second")  # updates the cached entry in place
    assert index.match("a.b") == ("first", "second", "tail")
    assert index.remove("a.b", "first")
    assert index.match("a.b") == ("second", "tail")


def test_removing_wildcards_prunes_the_trie() -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for i in range(100):
        index.add(f"reply.{i}.*.>", i)
    for i in range(100):
        assert index.remove(f"reply.{i}.*.>", i)
    assert index._root.empty()
    assert index.match("reply.1.x.y") == ()


def test_a_subscribe_updates_only_the_cached_topics_it_affects() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("events.>", "all")
    for i in range(50):
        index.match(f"events.task.{i}")
    cached = dict(index.cache)
    index.add("reply.7", "inbox")  # exact, unrelated: nothing cached changes
    assert index.cache == cached
    index.add("events.task.3", "one")
    assert index.cache["events.task.3"] == ("one", "all")
    assert index.cache["events.task.4"] == ("all",)
    assert len(index.cache) == 50, "the cache was cleared"

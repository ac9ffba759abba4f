"""Which subscriptions a topic reaches: an index by segments with a match cache.

Matching a topic against every subscription grows with the number of subscriptions, and
clearing a route cache on every subscribe brings that scan back under churn (short-lived reply
and stream subscriptions). This index keeps exact patterns in a dict and wildcard patterns in a
trie of segments with ``*`` (one segment) and ``>`` (one or more trailing segments) nodes, as
the NATS server's sublist and RabbitMQ's topic exchange do, so a match costs about the topic's
depth whatever the number of subscriptions. Matches are cached per topic; a subscribe or
unsubscribe updates only the cached topics it affects (one entry for an exact pattern; for a
wildcard pattern, the cached topics it matches), never clears the cache.

Pure: no I/O, no broker. The semantics are exactly :func:`amb_core.topics.matches` (checked by
a property test).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from amb_core.topics import is_wildcard, matches

T = TypeVar("T")


class _Node(Generic[T]):
    __slots__ = ("children", "star", "tail", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.tail: list[T] = []
        """Values of patterns ending in ``>`` here: one or more further segments match."""
        self.values: list[T] = []
        """Values of patterns ending exactly here."""

    def empty(self) -> bool:
        return not (self.children or self.star or self.tail or self.values)


class SubscriptionIndex(Generic[T]):
    """Values (subscriptions, routing targets) by pattern; :meth:`match` gives those whose
    pattern matches a topic: exact patterns first, in the order added, then wildcard ones.
    Values are told apart by identity.

    ``cache`` maps topics seen to their matches; a caller on a hot path may read it directly
    (``index.cache.get(topic)``) and call :meth:`match` on a miss. It holds at most
    ``max_cached`` topics, then starts over (topics new on every message must not grow it
    without end).
    """

    __slots__ = ("_exact", "_max_cached", "_root", "_size", "cache")

    def __init__(self, max_cached: int = 10_000) -> None:
        self._exact: dict[str, list[T]] = {}
        self._root: _Node[T] = _Node()
        self._max_cached = max_cached
        self._size = 0
        self.cache: dict[str, tuple[T, ...]] = {}

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, value: T) -> None:
        self._size += 1
        cache = self.cache
        if not is_wildcard(pattern):
            self._exact.setdefault(pattern, []).append(value)
            cached = cache.get(pattern)
            if cached is not None:
                # exact values come first, in the order added
                exact_count = len(self._exact[pattern]) - 1
                cache[pattern] = (*cached[:exact_count], value, *cached[exact_count:])
            return
        node = self._root
        segments = pattern.split(".")
        for segment in segments[:-1]:
            node = self._child(node, segment)
        last = segments[-1]
        if last == ">":
            node.tail.append(value)
        else:
            self._child(node, last).values.append(value)
        for topic in [t for t in cache if matches(pattern, t)]:
            cache[topic] = self._lookup(topic)  # its place among the wildcard values

    @staticmethod
    def _child(node: _Node[T], segment: str) -> _Node[T]:
        if segment == "*":
            if node.star is None:
                node.star = _Node()
            return node.star
        child = node.children.get(segment)
        if child is None:
            child = node.children[segment] = _Node()
        return child

    def remove(self, pattern: str, value: T) -> bool:
        """Forget ``value`` under ``pattern``; False if it was not there."""
        cache = self.cache
        if not is_wildcard(pattern):
            values = self._exact.get(pattern)
            if not values or not _discard(values, value):
                return False
            if not values:
                del self._exact[pattern]
            cached = cache.get(pattern)
            if cached is not None:
                cache[pattern] = _without(cached, value)
            self._size -= 1
            return True
        segments = pattern.split(".")
        path: list[tuple[_Node[T], str]] = []
        node: _Node[T] | None = self._root
        for segment in segments[:-1]:
            assert node is not None
            path.append((node, segment))
            node = node.star if segment == "*" else node.children.get(segment)
            if node is None:
                return False
        assert node is not None
        last = segments[-1]
        if last == ">":
            if not _discard(node.tail, value):
                return False
        else:
            path.append((node, last))
            leaf = node.star if last == "*" else node.children.get(last)
            if leaf is None or not _discard(leaf.values, value):
                return False
            node = leaf
        self._prune(path, node)
        for topic in [t for t in cache if matches(pattern, t)]:
            cache[topic] = _without(cache[topic], value)
        self._size -= 1
        return True

    @staticmethod
    def _prune(path: list[tuple[_Node[T], str]], node: _Node[T]) -> None:
        """Drop the nodes a removal left empty, bottom up (wildcard churn stays bounded)."""
        for parent, segment in reversed(path):
            if not node.empty():
                return
            if segment == "*":
                parent.star = None
            else:
                del parent.children[segment]
            node = parent

    def match(self, topic: str) -> tuple[T, ...]:
        """The values whose pattern matches ``topic`` (cached)."""
        found = self.cache.get(topic)
        if found is None:
            found = self._lookup(topic)
            if len(self.cache) >= self._max_cached:
                self.cache.clear()
            self.cache[topic] = found
        return found

    def _lookup(self, topic: str) -> tuple[T, ...]:
        exact = self._exact.get(topic)
        found: list[T] = list(exact) if exact else []
        root = self._root
        if root.children or root.star is not None or root.tail:
            _walk(root, topic.split("."), 0, found)
        return tuple(found)

    def values(self) -> list[T]:
        """Every value, each once per pattern it was added under."""
        found = [v for values in self._exact.values() for v in values]
        stack = [self._root]
        while stack:
            node = stack.pop()
            found += node.tail
            found += node.values
            stack += node.children.values()
            if node.star is not None:
                stack.append(node.star)
        return found


def _walk(node: _Node[T], parts: list[str], index: int, found: list[T]) -> None:
    if index == len(parts):
        found += node.values
        return
    if node.tail:
        found += node.tail  # '>' here: at least one segment is left
    child = node.children.get(parts[index])
    if child is not None:
        _walk(child, parts, index + 1, found)
    if node.star is not None:
        _walk(node.star, parts, index + 1, found)


def _discard(values: list[T], value: T) -> bool:
    for i, existing in enumerate(values):
        if existing is value:
            del values[i]
            return True
    return False


def _without(values: tuple[T, ...], value: T) -> tuple[T, ...]:
    for i, existing in enumerate(values):
        if existing is value:
            return values[:i] + values[i + 1:]
    return values

"""One map from a client library's exceptions to amb's, written once per adapter.

Modelled on httpx's ``map_httpcore_exceptions``: an adapter declares which of its client's
exception types mean what (lost or refused connection, timeout, refused by the broker) and
every call site goes through the map, instead of a ``try``/``except`` written differently at
each. The client library is imported lazily, so the map is built on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from amb_core.errors import AmbError

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]
Mapping = Sequence[tuple[ExceptionTypes, type[BaseException]]]


class ErrorMap:
    """``build()`` returns ``[(client exception types, amb exception class), ...]``, first
    match wins. amb's own errors and cancellation pass through untouched; an exception that
    matches nothing is re-raised as it is (a bug is better seen than renamed)."""

    __slots__ = ("_build", "_mapping", "broker")

    def __init__(self, broker: str, build: Callable[[], Mapping]) -> None:
        self.broker = broker
        self._build = build
        self._mapping: Mapping | None = None

    @property
    def mapping(self) -> Mapping:
        if self._mapping is None:
            self._mapping = tuple(self._build())
        return self._mapping

    def translate(self, exc: BaseException, what: str) -> BaseException:
        """The amb exception for ``exc`` (raised while doing ``what``), or ``exc`` itself."""
        if isinstance(exc, (AmbError, asyncio.CancelledError)):
            return exc
        for types, target in self.mapping:
            if isinstance(exc, types):
                text = str(exc) or type(exc).__name__
                return target(f"{self.broker}: {what} failed: {text}")
        return exc

    @contextmanager
    def mapped(self, what: str) -> Iterator[None]:
        """``with errors.mapped("publish to 'x'"): ...`` raises amb's errors for the client's."""
        try:
            yield
        except BaseException as exc:
            translated = self.translate(exc, what)
            if translated is exc:
                raise
            raise translated from exc

"""The exceptions amb-core raises. Each subclasses the built-in a user would catch anyway."""

from __future__ import annotations


class AmbError(Exception):
    """Base class of amb-core's own errors."""


class BrokerConnectionError(AmbError, ConnectionError):
    """The broker could not be reached or refused the connection.

    A ``ConnectionError``, so ``except ConnectionError:`` retry loops work."""


class RequestTimeout(AmbError, TimeoutError):
    """No reply arrived within the request's timeout (``except TimeoutError`` works)."""


class NoResponders(RequestTimeout):
    """The broker knows that nobody serves the request's topic, so the request failed fast."""


class UnsupportedFeature(AmbError, NotImplementedError):
    """The broker (or this adapter) cannot do what was asked; nothing is emulated badly."""


class MissingDependency(AmbError, ImportError):
    """An adapter's client library is not installed; the message names the extra to install."""


class DecodeError(AmbError, ValueError):
    """Bytes that claim to be an amb envelope are not a valid one."""


class NotConnected(AmbError, RuntimeError):
    """The bus was used before ``connect()`` or after ``close()``."""


class RemoteError(AmbError, RuntimeError):
    """The handler that served a request or stream raised; ``remote_type`` and ``remote_text``
    are its exception's type name and text (nothing else of it crosses the wire)."""

    def __init__(self, remote_type: str, remote_text: str, topic: str = "") -> None:
        where = f" serving {topic!r}" if topic else ""
        super().__init__(f"the handler{where} raised {remote_type}: {remote_text}")
        self.remote_type = remote_type
        self.remote_text = remote_text

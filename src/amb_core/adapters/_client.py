"""Lazy imports of broker client libraries, so the core needs none of them."""

from __future__ import annotations

from typing import ClassVar

from amb_core._optional import require
from amb_core.broker import Broker, BrokerSubscription, DeliveryHandler
from amb_core.errors import UnsupportedFeature

__all__ = ["PlaceholderBroker", "not_implemented_yet", "require"]


def not_implemented_yet(adapter: str, module: str, extra: str) -> UnsupportedFeature:
    """For adapters whose implementation has not landed: fail loudly, never no-op."""
    require(module, extra)
    return UnsupportedFeature(
        f"{adapter} is not implemented yet in this version of amb-core; "
        "see the README's capability table for what works today"
    )


class PlaceholderBroker(Broker):
    """Base of adapters named in the API whose implementation has not landed yet.

    Constructing one does no I/O; every use raises (MissingDependency first if the client
    library is absent, else UnsupportedFeature saying it is not implemented yet).
    """

    client_module: ClassVar[str]
    extra: ClassVar[str]

    def _unavailable(self) -> UnsupportedFeature:
        return not_implemented_yet(type(self).__name__, self.client_module, self.extra)

    async def connect(self) -> None:
        raise self._unavailable()

    async def close(self) -> None:
        return None

    async def publish(self, topic: str, body: bytes, headers: dict[str, str]) -> None:
        raise self._unavailable()

    async def subscribe(
        self, pattern: str, handler: DeliveryHandler, *, group: str | None = None,
        prefetch: int = 1,
    ) -> BrokerSubscription:
        raise self._unavailable()

"""The contract suite, importable by anyone who writes an adapter (needs pytest and
pytest-asyncio, from ``amb-core[dev]``)."""

from amb_core.testing.contract import BrokerContract, Collector

__all__ = ["BrokerContract", "Collector"]

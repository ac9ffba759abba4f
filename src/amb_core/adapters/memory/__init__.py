"""The in-process broker (see :mod:`amb_core.adapters.memory.broker`)."""

from amb_core.adapters.memory.broker import MemoryBroker

__all__ = ["MemoryBroker"]

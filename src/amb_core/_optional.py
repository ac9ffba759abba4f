"""Optional dependencies (broker clients, metrics libraries): imported when used, never by the
core at import time."""

from __future__ import annotations

import importlib
from types import ModuleType

from amb_core.errors import MissingDependency


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an error that names the ``pip install`` to run."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{module} is not installed; run: pip install 'amb-core[{extra}]'"
        ) from exc

"""Lazy imports of broker client libraries, so the core needs none of them."""

from __future__ import annotations

from amb_core._optional import require

__all__ = ["require"]

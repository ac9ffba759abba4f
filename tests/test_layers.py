"""Imports run only downward: core and contract at the bottom, then the runtime, then the
adapters (and, beside them, observability), then the bus, then what users run. Every import
counts, including those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "amb_core"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("amb_core._version", "amb_core._optional", "amb_core.errors", "amb_core.message",
              "amb_core.topics", "amb_core.retry", "amb_core.envelope",
              "amb_core.deadletters", "amb_core.routing", "amb_core.conversation")),
    ("contract", ("amb_core.broker", "amb_core.hooks")),
    ("runtime", ("amb_core.runtime",)),
    ("adapters", ("amb_core.adapters", "amb_core.observability")),
    ("bus", ("amb_core.bus", "amb_core.config")),
    ("entry points", ("amb_core", "amb_core.testing", "amb_core.cli", "amb_core.demo",
                      "amb_core.bench", "amb_core.__main__")),
]
# Side by side in one layer, but never importing each other.
APART = ("amb_core.observability", "amb_core.adapters")
SHARED_ADAPTER_MODULES = ("amb_core.adapters", "amb_core.adapters._client")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return best


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name(path).split(".")
                if path.name != "__init__.py":
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from amb_core import envelope`` imports a module
                submodule = f"{target}.{alias.name}"
                relative = Path(*submodule.split("."))
                if (SRC / relative).with_suffix(".py").exists() or (SRC / relative).is_dir():
                    found.append((node.lineno, submodule))
                else:
                    found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "amb_core"]


def adapter_package(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "adapters" and module not in SHARED_ADAPTER_MODULES:
        return parts[2]
    return None


def test_imports_run_only_downward() -> None:
    offenders: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in imported_modules(path):
            where = f"{path.relative_to(SRC)}:{line}: {source} imports {target}"
            if layer_of(target) > layer_of(source):
                offenders.append(f"{where} (upward)")
            for a, b in (APART, APART[::-1]):
                if source.startswith(a) and target.startswith(b):
                    offenders.append(f"{where} ({a} and {b} stay apart)")
            mine, theirs = adapter_package(source), adapter_package(target)
            if mine and theirs and mine != theirs:
                offenders.append(f"{where} (one adapter imports another)")
    assert not offenders, "\n".join(offenders)


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check itself can fail: an adapter importing the bus is upward."""
    assert layer_of("amb_core.bus") > layer_of("amb_core.adapters.redis")
    assert layer_of("amb_core") > layer_of("amb_core.runtime.pump")
    assert adapter_package("amb_core.adapters.nats.broker") == "nats"
    assert adapter_package("amb_core.adapters._client") is None

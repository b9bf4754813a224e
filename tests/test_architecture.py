"""The layout the code promises, checked from its imports (read with ``ast``, not run).

Core modules import neither Typer nor Litestar; the HTTP layer reaches the live state only
through :class:`opulon.runtime.Runtime`; the usage writer does not import the limiter; no
module imports a module above it in the request path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opulon"
# The parts behind the runtime: the HTTP layer must not name them.
LIVE_STATE = {
    "opulon.limiter": {"Limiter"},
    "opulon.keys": {"KeyRing", "KeyStore"},
    "opulon.providers": {"ProviderTable", "ProviderStore"},
    "opulon.usage": {"UsageWriter"},
    "opulon.usage_store": {"SqliteUsageStore", "DatabaseUsageStore"},
    "opulon.storage": {"open_store", "connect"},
    "opulon.limiter_redis": {"RedisLimiter", "LocalLimiter", "FallbackLimiter"},
    "opulon.store_postgres": {"PgConnection"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, set[str]]]:
    """(module, names imported from it) for every import in the file, lazy ones included."""
    found: list[tuple[str, set[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, set()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, {alias.name for alias in node.names}))
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
ADAPTERS = ("opulon.cli", "opulon.gateway", "opulon.web", "opulon.__main__")
CORE = [m for m in MODULES if not m.startswith(ADAPTERS)]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_neither_typer_nor_litestar_nor_rich(module: str) -> None:
    for name, _ in _imports(MODULES[module]):
        assert name.split(".")[0] not in {"typer", "litestar", "rich", "jinja2"}, (module, name)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("opulon.gateway")])
def test_the_http_layer_reaches_the_live_state_only_through_the_runtime(module: str) -> None:
    for name, names in _imports(MODULES[module]):
        forbidden = names & LIVE_STATE.get(name, set())
        assert not forbidden, f"{module} imports {sorted(forbidden)} from {name}"
    source = MODULES[module].read_text()
    for attribute in ("._limiter", "._keyring", "._providers", "._usage", "._store"):
        assert f"runtime{attribute}" not in source, (module, attribute)


def test_the_usage_writer_does_not_import_the_limiter() -> None:
    for module in ("opulon.usage", "opulon.usage_store"):
        assert all(name != "opulon.limiter" for name, _ in _imports(MODULES[module])), module


def test_the_limiter_builds_no_header_bytes() -> None:
    source = MODULES["opulon.limiter"].read_text()
    assert "ratelimit" not in source.lower().replace("rate-limit", "")
    assert ".encode()" not in source


def test_core_modules_never_import_the_adapters() -> None:
    for module in CORE:
        for name, _ in _imports(MODULES[module]):
            assert not name.startswith(("opulon.cli", "opulon.gateway")), (module, name)

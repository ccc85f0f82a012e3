"""`cache` stays model-agnostic: no import of `server`, FastAPI or pydantic anywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import cache

FORBIDDEN = ("server", "fastapi", "pydantic", "pydantic_settings", "prometheus_client", "starlette")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_cache_imports_nothing_forbidden() -> None:
    files = sorted(Path(cache.__file__).parent.glob("**/*.py"))
    assert len(files) > 5
    for path in files:
        bad = {m for m in _imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {bad}"

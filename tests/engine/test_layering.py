"""The layer rule for engine/: it may use core/ and below, never server/ (the server builds on it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pagedllm.engine

ENGINE_DIR = Path(pagedllm.engine.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_does_not_import_server() -> None:
    offenders = {path.name: sorted(m for m in _imported_modules(path) if m.startswith("pagedllm.server"))
                 for path in ENGINE_DIR.glob("*.py")}
    assert not {name: mods for name, mods in offenders.items() if mods}

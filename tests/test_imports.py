"""No two pagedllm modules import each other.

A mutual import pair is a cycle that only works by import order (or by a lazy
import inside a function), and it blurs which of the two is the lower layer.
Every import statement counts: module level, inside functions and under
``if TYPE_CHECKING:``; ``from pkg import name`` counts as importing ``pkg.name``
when that is a module, else ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pagedllm

PACKAGE_DIR = Path(pagedllm.__file__).resolve().parent
# Mutual imports allowed on purpose (none today).
KNOWN_PAIRS: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(module: str, name: str | None, known: dict[str, Path]) -> str:
    """``from module import name``: the submodule when ``name`` is one, else the module."""
    if name and f"{module}.{name}" in known:
        return f"{module}.{name}"
    return module


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The pagedllm modules ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            found.update(_resolve(base, alias.name, known) for alias in node.names)
    return {name for name in found if name in known and name != module}


def test_no_module_pair_imports_each_other() -> None:
    known = _all_modules()
    graph = {module: imports_of(module, path, known) for module, path in known.items()}
    pairs = {frozenset({a, b}) for a, deps in graph.items() for b in deps if a in graph.get(b, set())}
    unexpected = sorted(tuple(sorted(pair)) for pair in pairs - KNOWN_PAIRS)
    assert not unexpected, f"modules that import each other: {unexpected}"


def test_walker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pagedllm.config import ModelConfig\n"
        "def f():\n    from pagedllm.attention import torch_ref\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = _all_modules()
    assert imports_of("pagedllm.probe", path, known) == {"pagedllm.config", "pagedllm.attention.torch_ref"}

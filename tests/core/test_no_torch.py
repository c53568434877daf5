"""core/ is pure Python: importing it loads no torch and no pagedllm module beyond config and sampling_params."""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pagedllm.core

REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_DIR = Path(pagedllm.core.__file__).resolve().parent
# lora.request: the LoRARequest a request carries (a torch-free dataclass, like SamplingParams).
ALLOWED_OUTSIDE_CORE = {"pagedllm.config", "pagedllm.sampling_params", "pagedllm.lora.request"}
HEAVY = ("torch", "transformers", "triton")  # the last two import torch themselves


def _core_modules() -> list[str]:
    mods = ["pagedllm.core." + m.name for m in pkgutil.iter_modules([str(CORE_DIR)])]
    assert {"pagedllm.core.request", "pagedllm.core.block_pool", "pagedllm.core.kv_cache_manager",
            "pagedllm.core.scheduler", "pagedllm.core.outputs"} <= set(mods)
    return mods


def _imported_in_fresh_interpreter(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _pagedllm_modules(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.startswith("pagedllm.")}


def _assert_no_heavy(loaded: set[str], what: str) -> None:
    for heavy in HEAVY:
        assert not {m for m in loaded if m == heavy or m.startswith(heavy + ".")}, f"{what} imports {heavy}"


def test_importing_core_does_not_import_torch():
    loaded = _imported_in_fresh_interpreter(_core_modules())
    assert "pagedllm.core.scheduler" in loaded  # the probe really imported core
    _assert_no_heavy(loaded, "pagedllm.core")
    # Whatever `import pagedllm` (the package __init__) loads comes with any pagedllm.* import;
    # beyond that, core may only reach config and sampling_params.
    package_baseline = _pagedllm_modules(_imported_in_fresh_interpreter(["pagedllm"]))
    outside = {m for m in _pagedllm_modules(loaded) if not m.startswith("pagedllm.core")}
    extra = outside - ALLOWED_OUTSIDE_CORE - package_baseline
    assert not extra, f"pagedllm.core pulls in {extra}"


def test_package_init_and_allowed_dependencies_do_not_import_torch():
    loaded = _imported_in_fresh_interpreter(["pagedllm", *sorted(ALLOWED_OUTSIDE_CORE)])
    _assert_no_heavy(loaded, "pagedllm, pagedllm.config or pagedllm.sampling_params")


def _imports_of(path: Path) -> set[str]:
    """Every absolute module a file imports, wherever the import statement sits (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against pagedllm.core
                base = ["pagedllm", "core"][: 3 - node.level]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def test_core_sources_import_only_core_config_and_sampling_params():
    # Catches lazy imports inside functions too, which the subprocess check cannot see.
    files = sorted(CORE_DIR.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _imports_of(path):
            top = name.split(".")[0]
            assert top not in HEAVY, f"{path.name} imports {name}"
            if top == "pagedllm":
                assert name.startswith("pagedllm.core") or name in ALLOWED_OUTSIDE_CORE, f"{path.name} imports {name}"

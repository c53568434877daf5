"""Mutation testing on a seeded random sample of mutants per package (`make mutation`; not part of CI).

mutmut generates every mutant of the [tool.mutmut] `only_mutate` files (about 5,000), far too many to run on
2 cores; this picks SAMPLE mutants per package with a fixed SEED, runs `mutmut run` on just those (with the fast
tests listed in pyproject.toml) and prints killed / survived per package. `mutmut show NAME` gives a mutant's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

PACKAGES = {
    "core": "mutants/pagedllm/core",
    "engine": "mutants/pagedllm/engine",
    "server": "mutants/pagedllm/server",
    "sampler": "mutants/pagedllm/models/layers/sampler.py",
}
KILLED = {1, 3}  # a failing test or a pytest error. Timeouts are reported apart: not counted as killed
TIMEOUT = {36, -24, 24, 152, 255}


def mutant_names(root: Path) -> list[str]:
    metas = [Path(f"{root}.meta")] if root.suffix == ".py" else sorted(root.rglob("*.meta"))
    return sorted(name for meta in metas for name in json.loads(meta.read_text())["exit_code_by_key"])


def exit_codes() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in Path("mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def generate() -> None:
    """mutmut's own generation step, so the mutant names exist before the sample is drawn."""
    code = ("from pathlib import Path; from mutmut.__main__ import create_mutants, set_mutant_under_test; "
            "from mutmut.utils.file_utils import copy_src_dir, copy_also_copy_files, setup_source_paths; "
            "Path('mutants').mkdir(exist_ok=True); set_mutant_under_test('mutant_generation'); "
            "copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(2)")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=int, default=40, help="mutants per package")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only print the last run's results for the sample")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run again only the sampled mutants that are not killed yet (after adding tests)")
    args = parser.parse_args()
    if not args.report:
        generate()
    rng = random.Random(args.seed)
    sample = {}
    for pkg in PACKAGES:  # every package draws, so one package's sample does not depend on --packages
        names = mutant_names(Path(PACKAGES[pkg]))
        sample[pkg] = rng.sample(names, min(args.sample, len(names)))
    chosen = [name for pkg in args.packages for name in sample[pkg]]
    if args.rerun_survivors:
        codes = exit_codes()
        chosen = [name for name in chosen if codes.get(name) not in KILLED]
    if not args.report and chosen:
        mutmut = Path(sys.executable).with_name("mutmut")
        # One torch thread: mutmut forks each mutant's run from a process that has loaded torch, and a forked
        # child with a live intra-op thread pool can spin until mutmut's CPU limit, a false "timeout".
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        run = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children), *chosen], check=False,
                             env=env)
        if run.returncode != 0:
            sys.exit(f"mutmut run failed with exit code {run.returncode}")
    report(args.packages, sample)


def report(packages: list[str], sample: dict[str, list[str]]) -> None:
    codes = exit_codes()
    for pkg in packages:
        survivors = [n for n in sample[pkg] if codes.get(n) not in KILLED]
        killed = len(sample[pkg]) - len(survivors)
        unchecked = sum(codes.get(n) is None for n in survivors)
        timeouts = sum(codes.get(n) in TIMEOUT for n in survivors)
        print(f"{pkg}: {killed}/{len(sample[pkg])} killed ({100 * killed / len(sample[pkg]):.0f}%)"
              + (f", {timeouts} timed out" if timeouts else "") + (f", {unchecked} not run yet" if unchecked else ""))
        for name in survivors:
            print(f"    survived ({codes.get(name)}): {name}")


if __name__ == "__main__":
    main()

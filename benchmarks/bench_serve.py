"""Serving vs offline, before and after the engine core process, in one run (issue 10's CPU target).

For each layout (``--engine-in-process``: the engine on a thread of the server, as before issue 10; default:
the engine core process) it runs ``pagedllm bench serve --launch --compare-offline``: N concurrent streaming
clients against a freshly started server, then the same requests offline through ``LLM.generate``, and prints
serve / offline output tok/s. Ratios are measured within one call, so a busy machine skews them less than the
absolute figures; run it on an idle machine for the record.

    PYTHONPATH=. python benchmarks/bench_serve.py                      # 64 clients, the default model (CPU)

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: two OpenMP threads per process on an oversubscribed
2-core machine made an offline prefill step 11x slower (124.8 s against 10.9 s, 64 x 32 tokens, measured
2026-12-04 at load average 12), which turns the serve / offline ratio into noise.
    PYTHONPATH=. python benchmarks/bench_serve.py --server-args "--model benchmarks/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16 --skip-tokenizer-init --max-model-len 2048" \\
        --dataset mix256 --num-prompts 256 --concurrency 256 --output-len 256 --logprobs 0   # the H200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {"engine in process (before)": ["--engine-in-process"], "engine core process (after)": []}


def run_layout(args: argparse.Namespace, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "pagedllm.cli", "bench", "serve", "--launch",
               "--server-args", " ".join([args.server_args, *extra]).strip(), "--dataset", args.dataset,
               "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--concurrency", str(args.concurrency),
               "--compare-offline", "--no-progress", "--json", out.name]
        if args.logprobs is not None:
            cmd += ["--logprobs", str(args.logprobs)]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-args", default="--max-model-len 512")
    ap.add_argument("--dataset", default="random")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--logprobs", type=int, default=None)
    ap.add_argument("--only-after", action="store_true", help="skip the --engine-in-process run")
    args = ap.parse_args()
    print("| layout | serve out tok/s | offline out tok/s | serve / offline | TTFT p50 ms | ITL p50 ms | "
          "failed |\n|---|---|---|---|---|---|---|")
    for name, extra in LAYOUTS.items():
        if args.only_after and extra:
            continue
        r = run_layout(args, extra)
        s, off = r["serve"][0], r["offline"]
        print(f"| {name} | {s['output_throughput']:.1f} | {off['output_throughput']:.1f} | "
              f"{100 * s['output_throughput'] / off['output_throughput']:.1f}% | {s['ttft_ms']['p50']:.0f} | "
              f"{s['itl_ms']['p50']:.1f} | {s['num_failed']} |", flush=True)


if __name__ == "__main__":
    main()

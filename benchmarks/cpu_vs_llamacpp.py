"""CPU serving speed of the default model: pagedllm against llama.cpp and HF transformers, in one run.

Same GGUF file (SmolLM2-135M-Instruct Q4_1) for everyone, same machine, same run, so the ratios hold even when
the machine is busy (absolute numbers do not). Measured:

- batch-1 decode and prefill tok/s: pagedllm `LLM` (each mode in --modes), HF transformers fp32, and
  `llama-bench` (tg / pp) when the llama.cpp peer is built (../shared/peers/build-llama-server.sh);
- serve64: `--clients` concurrent /v1/completions clients (~100-token prompts, `--output-len` tokens, greedy,
  ignore_eos) through `pagedllm serve` and `llama-server -np 16`, the same load generator for both: output
  tok/s, time from launch to the first answered request, peak RSS of the server process.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [--quick] [--llama-bin /tmp/llama-peer/llama.cpp/build/bin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time

WORDS = ("the quick brown fox jumps over a lazy dog while seven robots discuss rivers mountains tea and the "
         "long history of small villages by the sea").split()


def make_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


# ---- batch 1 -------------------------------------------------------------
def bench_pagedllm(dtype: str, prompt_len: int, decode_len: int) -> dict[str, float]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(device="cpu", dtype=dtype, max_model_len=2048, enable_prefix_caching=False)
    ids = list(range(1000, 1000 + prompt_len))  # token ids: the same length whatever the tokenizer
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate({"prompt_token_ids": ids[:16]}, one, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, one, use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate({"prompt_token_ids": ids[:8]}, SamplingParams(temperature=0, max_tokens=decode_len, ignore_eos=True),
                 use_tqdm=False)
    decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": decode_len / decode_s}


def bench_hf(prompt_len: int, decode_len: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm.loader import default_model_path

    directory, filename = os.path.split(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
    ids = torch.arange(1000, 1000 + prompt_len)[None]
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        model(ids)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids[:, :8], max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False)
        decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": decode_len / decode_s}


def bench_llama_bench(bin_dir: str, model: str, prompt_len: int, decode_len: int, threads: int) -> dict[str, float]:
    out = subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", model, "-p", str(prompt_len), "-n",
                          str(decode_len), "-t", str(threads), "-r", "2", "-o", "json"],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    rows = json.loads(out)
    result = {}
    for row in rows:
        key = "prefill_tok_s" if row.get("n_prompt", 0) > 0 else "decode_tok_s"
        result[key] = float(row["avg_ts"])
    return result


# ---- serve64 -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """VmHWM of ``pid`` and its children (the engine may run in a child process)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            pass
    return total / 1024


async def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = await client.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not answer in time")


async def _load(base: str, model: str, prompts: list[str], output_len: int) -> tuple[int, float]:
    import httpx

    async def one(client: httpx.AsyncClient, prompt: str) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True}
        r = await client.post(f"{base}/v1/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(client, p) for p in prompts))
        return sum(counts), time.perf_counter() - t0


def bench_server(cmd: list[str], port: int, model: str, prompts: list[str], output_len: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_wait_ready(base, proc, timeout=600))
        ready_s = time.perf_counter() - t0
        tokens, elapsed = asyncio.run(_load(base, model, prompts, output_len))
        return {"output_tok_s": tokens / elapsed, "first_answer_s": ready_s, "peak_rss_mib": peak_rss_mib(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---- main ----------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", default="/tmp/llama-peer/llama.cpp/build/bin")
    ap.add_argument("--modes", default="auto,float32", help="pagedllm --dtype values (auto = the CPU fast path)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every path")
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.decode_len, args.clients, args.output_len = 128, 32, 8, 16
    from pagedllm.loader import default_model_path

    gguf = default_model_path()
    have_llama = os.path.exists(os.path.join(args.llama_bin, "llama-server"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{os.path.basename(gguf)}", flush=True)
    results: dict[str, dict[str, float]] = {}
    for mode in args.modes.split(","):
        results[f"pagedllm {mode}"] = bench_pagedllm(mode, args.prompt_len, args.decode_len)
        print(f"pagedllm {mode}: {results[f'pagedllm {mode}']}", flush=True)
    results["hf fp32"] = bench_hf(args.prompt_len, args.decode_len)
    print(f"hf fp32: {results['hf fp32']}", flush=True)
    if have_llama:
        try:
            results["llama-bench"] = bench_llama_bench(args.llama_bin, gguf, args.prompt_len, args.decode_len,
                                                       args.threads)
        except (subprocess.SubprocessError, ValueError, KeyError) as e:  # e.g. a build this CPU cannot run
            print(f"llama-bench failed: {e!r}", flush=True)
        print(f"llama-bench: {results.get('llama-bench')}", flush=True)
    if not args.skip_serve:
        rng = random.Random(0)
        prompts = [make_prompt(rng, 75) for _ in range(args.clients)]  # ~100 tokens each
        port = free_port()
        ours = [sys.executable, "-m", "pagedllm.server.api_server", "--port", str(port), "--served-model-name",
                "default", "--uvicorn-log-level", "warning"]
        results["serve pagedllm"] = bench_server(ours, port, "default", prompts, args.output_len)
        print(f"serve pagedllm: {results['serve pagedllm']}", flush=True)
        if have_llama:
            port = free_port()
            theirs = [os.path.join(args.llama_bin, "llama-server"), "-m", gguf, "--port", str(port), "-np", "16",
                      "-c", str(16 * (160 + args.output_len)), "-t", str(args.threads)]
            try:
                results["serve llama-server"] = bench_server(theirs, port, "default", prompts, args.output_len)
            except (RuntimeError, OSError) as e:
                print(f"llama-server failed: {e!r}", flush=True)
            print(f"serve llama-server: {results.get('serve llama-server')}", flush=True)
    print(json.dumps(results, indent=1))
    _print_ratios(results)


def _print_ratios(results: dict[str, dict[str, float]]) -> None:
    fast = results.get("pagedllm auto", {})
    for peer in ("llama-bench", "hf fp32", "pagedllm float32"):
        for key in ("decode_tok_s", "prefill_tok_s"):
            if key in fast and key in results.get(peer, {}):
                print(f"pagedllm auto / {peer} {key}: {fast[key] / results[peer][key]:.2f}x")
    ours, theirs = results.get("serve pagedllm"), results.get("serve llama-server")
    if ours and theirs:
        print(f"serve: pagedllm / llama-server output tok/s: {ours['output_tok_s'] / theirs['output_tok_s']:.2f}x")


if __name__ == "__main__":
    main()

"""Offline throughput on the CPU: pagedllm against HF transformers `generate`, same prompts, same model.

The default model (SmolLM2-135M-Instruct GGUF, fp32). Both generate `--output-len` tokens per prompt greedily
with EOS ignored; HF runs padded static batches of `--hf-batch` prompts (left padding).

    .venv/bin/python benchmarks/throughput.py [--num-prompts 32] [--output-len 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import time

WORDS = ("the quick brown fox jumps over a lazy dog while seven robots discuss rivers mountains tea and the "
         "long history of small villages by the sea").split()


def make_prompts(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 128))) for _ in range(num)]


def bench_pagedllm(prompts: list[str], output_len: int) -> tuple[float, int]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(device="cpu", max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_hf(prompts: list[str], output_len: int, batch: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedllm.loader import default_model_path

    path = default_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            total += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8)
    args = ap.parse_args()
    prompts = make_prompts(args.num_prompts)
    p_s, p_n = bench_pagedllm(prompts, args.output_len)
    h_s, h_n = bench_hf(prompts, args.output_len, args.hf_batch)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit {commit}")
    print(f"{args.num_prompts} prompts (16-128 words), {args.output_len} output tokens each, greedy, ignore_eos")
    print("| engine | output tokens | seconds | output tok/s |\n|---|---|---|---|")
    print(f"| pagedllm | {p_n} | {p_s:.1f} | {p_n / p_s:.1f} |")
    print(f"| HF generate (batch {args.hf_batch}) | {h_n} | {h_s:.1f} | {h_n / h_s:.1f} |")
    print(f"speedup: {(p_n / p_s) / (h_n / h_s):.2f}x")


if __name__ == "__main__":
    main()

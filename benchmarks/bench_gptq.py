"""bf16 vs gptq vs awq (4-bit, RTN-quantized at load from dummy weights) on one GPU, Llama-3-8B shape.

    PYTHONPATH=. python3 benchmarks/bench_gptq.py [--output-len 64] [--batch 64] [--config DIR]

Prints one table: weight GiB (linear layers + embeddings), batch-1 ms/token, batched output tok/s.
The 4-bit layers dequantize to bf16 and run cuBLAS (no fused Triton kernel yet).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from pagedllm import LLM, SamplingParams

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llama-3-8b"


def _weight_gib(llm: LLM) -> float:
    model = llm.engine.executor.worker.model_runner.model
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def _run(llm: LLM, batch: int, output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 1000 for j in range(32)]} for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for method in (None, "gptq", "awq"):
        llm = LLM(model=args.config, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  quantization=method, max_model_len=1024, gpu_memory_utilization=0.85)
        gib = _weight_gib(llm)
        ms = _run(llm, 1, args.output_len) / args.output_len * 1e3
        tok_s = args.batch * args.output_len / _run(llm, args.batch, args.output_len)
        rows.append((method or "bf16", gib, ms, tok_s))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{'method':8} {'weight GiB':>10} {'b1 ms/tok':>10} {f'b{args.batch} tok/s':>10}")
    for name, gib, ms, tok_s in rows:
        print(f"{name:8} {gib:10.2f} {ms:10.2f} {tok_s:10.0f}")


if __name__ == "__main__":
    main()

"""GPTQ/AWQ 4-bit on one GPU, Llama-3-8B shapes: the matmul, then the engine.

    PYTHONPATH=. python3 benchmarks/bench_gptq.py kernels
    PYTHONPATH=. python3 benchmarks/bench_gptq.py engine [--output-len 64] [--batch 64] [--config DIR]

kernels: for each projection (merged QKV, o, merged gate/up, down) and batch M, GPU microseconds
(CUDA graph of 10 calls, replayed: no launch overhead, as the engine's decode graphs) of the bf16
cuBLAS GEMM, of the 4-bit GPTQ matmul (group 128; Triton: in-kernel GEMM for M <= 16, dequantize
+ cuBLAS above), the same with groups of 64 and with act-order groups, and of the torch fallback (dequantize by torch
ops, then cuBLAS).
engine: bf16 vs gptq vs awq (dummy weights quantized at load): weight GiB, batch-1 ms/token,
batched output tok/s.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

HID, INTER = 4096, 14336
PROJ = {"qkv": (HID, 6144), "o": (HID, HID), "gate_up": (HID, 2 * INTER), "down": (INTER, HID)}
ROWS = (1, 16, 64, 256, 1024, 4096)
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llama-3-8b"


def _graph_us(fn, calls: int = 10, replays: int = 20) -> float:
    """GPU microseconds of one call of fn: a CUDA graph of ``calls`` calls, replayed ``replays`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles, cuBLAS picks) outside the graph
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays) * 1e3


def _layer_weights(k: int, n: int, act_order: bool, group: int = 128):
    from pagedllm.quantization.int_packing import pack_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(0, 16, (k, n), device="cuda", generator=gen, dtype=torch.int32)
    scales = torch.rand(k // group, n, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.01
    zeros = torch.full((k // group, n), 8.0, device="cuda", dtype=torch.bfloat16)
    g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, device="cuda", generator=gen)]
    return pack_rows(codes, 4), scales, zeros, g_idx


def kernels() -> None:
    from pagedllm.quantization.gptq_triton import gptq_matmul
    from pagedllm.quantization.int_packing import dequantize, unpack_rows

    print(f"{'proj':8} {'M':>5} {'bf16 us':>9} {'w4 us':>9} {'w4 g64 us':>9} {'w4 act us':>9} {'torch us':>9}"
          f" {'bf16/w4':>8}")
    for name, (k, n) in PROJ.items():
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed = _layer_weights(k, n, False)
        shuffled = _layer_weights(k, n, True)
        group64 = _layer_weights(k, n, False, group=64)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = _graph_us(lambda: x @ dense.t())  # noqa: B023
            t_w4 = _graph_us(lambda: gptq_matmul(x, *packed, 4, 128, False))  # noqa: B023
            t_g64 = _graph_us(lambda: gptq_matmul(x, *group64, 4, 64, False))  # noqa: B023
            t_act = _graph_us(lambda: gptq_matmul(x, *shuffled, 4, 128, True))  # noqa: B023
            t_torch = _graph_us(lambda: x @ dequantize(unpack_rows(packed[0], 4), *packed[1:]).t())  # noqa: B023
            print(f"{name:8} {m:5} {t_bf16:9.1f} {t_w4:9.1f} {t_g64:9.1f} {t_act:9.1f} {t_torch:9.1f}"
                  f" {t_bf16 / t_w4:8.2f}", flush=True)


def _engine_weight_gib(llm) -> float:
    model = llm.engine.executor.worker.model_runner.model
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def _engine_run(llm, batch: int, output_len: int) -> float:
    from pagedllm import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 1000 for j in range(32)]} for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up, compiles
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def engine(config: str, batch: int, output_len: int) -> None:
    from pagedllm import LLM

    rows = []
    for method in (None, "gptq", "awq"):
        llm = LLM(model=config, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  quantization=method, max_model_len=1024, gpu_memory_utilization=0.85)
        gib = _engine_weight_gib(llm)
        ms = _engine_run(llm, 1, output_len) / output_len * 1e3
        tok_s = batch * output_len / _engine_run(llm, batch, output_len)
        rows.append((method or "bf16", gib, ms, tok_s))
        print(rows[-1], flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{'method':8} {'weight GiB':>10} {'b1 ms/tok':>10} {f'b{batch} tok/s':>10}")
    for name, gib, ms, tok_s in rows:
        print(f"{name:8} {gib:10.2f} {ms:10.2f} {tok_s:10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("kernels", "engine"))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if args.mode == "kernels":
        kernels()
    else:
        engine(args.config, args.batch, args.output_len)


if __name__ == "__main__":
    main()

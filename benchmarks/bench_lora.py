"""Kernel-level cost of batched LoRA on one GPU (Llama-3-8B shapes, rank-16, dummy weights).

    PYTHONPATH=. python3 benchmarks/bench_lora.py [--tokens 256] [--output-len N]

For each Llama-3-8B projection (merged QKV, o, merged gate/up, down) times the base GEMM
alone and base GEMM + `add_lora_triton` with 1, 8 and 32 distinct adapters spread over the
batch, and batch-1 decode (one adapter) vs base. `--output-len` repeats the per-layer step
that many times (32 layers) to report an estimated decode-step overhead. Engine-level
serving with adapters is not wired yet, so this measures the kernel only.
"""

from __future__ import annotations

import argparse

import torch

from pagedllm.lora.triton_punica import add_lora_triton

HID, INTER, LAYERS, RANK = 4096, 14336, 32, 16
PROJ = {"qkv": (HID, 6144), "o": (HID, HID), "gate_up": (HID, 2 * INTER), "down": (INTER, HID)}


def _time(fn, iters: int = 50) -> float:
    """Mean ms of fn over iters after warm-up, with CUDA events."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _proj_ms(tokens: int, d_in: int, d_out: int, num_adapters: int | None) -> float:
    """ms for one projection GEMM (+ LoRA over `num_adapters` slots; None = base only)."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, d_in, device=dev, dtype=dt)
    w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5
    if num_adapters is None:
        return _time(lambda: x @ w.t())
    a = torch.randn(num_adapters, RANK, d_in, device=dev, dtype=dt) / d_in ** 0.5
    b = torch.randn(num_adapters, d_out, RANK, device=dev, dtype=dt) * 0.01
    slots = (torch.arange(tokens, device=dev) % num_adapters).to(torch.int32)
    return _time(lambda: add_lora_triton(x @ w.t(), x, a, b, slots))


def _layer_ms(tokens: int, num_adapters: int | None) -> float:
    """ms for one layer's four projections."""
    return sum(_proj_ms(tokens, d_in, d_out, num_adapters) for d_in, d_out in PROJ.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--output-len", type=int, default=1)
    args = p.parse_args()
    rows = [("base", args.tokens, None), ("1 adapter", args.tokens, 1), ("8 adapters", args.tokens, 8),
            ("32 adapters", args.tokens, 32), ("b1 base", 1, None), ("b1 adapter", 1, 1)]
    base = {}
    print(f"{'case':<12}{'tokens':>8}{'layer ms':>10}{'x base':>8}{'est. ms/' + str(args.output_len) + ' steps':>18}")
    for name, tokens, n in rows:
        ms = _layer_ms(tokens, n)
        base.setdefault(tokens, ms)
        print(f"{name:<12}{tokens:>8}{ms:>10.3f}{ms / base[tokens]:>8.2f}{ms * LAYERS * args.output_len:>18.2f}")


if __name__ == "__main__":
    main()

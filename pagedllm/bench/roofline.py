"""A workload's roofline on a GPU: the least time its bytes and FLOPs can take on this card.

    bound = prefill FLOPs / bf16 matmul rate  +  sum over decode steps of (weights + KV read) / bandwidth

Bandwidth and matmul rate are measured in the same run (a 2 GiB copy, an 8192^3
bf16 matmul), not taken from a spec sheet. Decode steps are memory bound at any
batch size that fits (``decode_compute_s`` says how far from compute bound).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def model_costs(cfg: dict) -> dict[str, float]:
    """Bytes and FLOPs of one token through a Llama-shaped model (bf16), from its config.json."""
    h, L, V, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    per_layer = h * (nh * hd) + 2 * h * (nkv * hd) + (nh * hd) * h + 3 * h * inter
    matmul_params = L * per_layer  # per token through the layers
    lm_head = h * V
    return {
        # bf16 bytes read per decode step: every matrix once, lm_head included; the embedding is a lookup.
        "weight_bytes": 2 * (matmul_params + lm_head),
        "layer_flops_per_token": 2 * matmul_params,
        "lm_head_flops": 2 * lm_head,
        "kv_bytes_per_token": L * 2 * nkv * hd * 2,
        "attn_flops_per_pair": L * 4 * nh * hd,  # QK^T and PV, per (query, key) pair
    }


def bound_seconds(prompt_lens: list[int], out_len: int | list[int], costs: dict, bw: float,
                  rate: float) -> dict[str, float]:
    """Prefill FLOPs over the matmul rate + each decode step's bytes over bandwidth (all requests at once).

    ``out_len``: one output length for all, or one per request (a request leaves the batch when done).
    """
    out_lens = [out_len] * len(prompt_lens) if isinstance(out_len, int) else list(out_len)
    prefill_flops = sum(costs["layer_flops_per_token"] * p + costs["attn_flops_per_pair"] * p * (p + 1) / 2
                        + costs["lm_head_flops"] for p in prompt_lens)
    prefill_s = prefill_flops / rate
    decode_s, decode_compute_s = 0.0, 0.0
    for j in range(1, max(out_lens, default=1)):  # the first token comes from the prefill
        live = [p for p, o in zip(prompt_lens, out_lens) if o > j]
        kv = sum(p + j for p in live) * costs["kv_bytes_per_token"]
        decode_s += (costs["weight_bytes"] + kv) / bw
        decode_compute_s += len(live) * (costs["layer_flops_per_token"] + costs["lm_head_flops"]) / rate
    return {"prefill_s": prefill_s, "decode_s": decode_s, "bound_s": prefill_s + decode_s,
            "decode_compute_s": decode_compute_s}


def measure_device() -> dict[str, Any]:
    """The card's copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s); needs CUDA and Triton."""
    import torch
    import triton

    if not torch.cuda.is_available():
        raise RuntimeError("--roofline needs a CUDA GPU")
    n = 1 << 30  # 2 GiB of bf16 per buffer: far larger than L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") / 1e3
    bw = 2 * src.numel() * src.element_size() / t
    src = dst = None
    torch.cuda.empty_cache()
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median") / 1e3
    return {"copy_bw": bw, "bf16_rate": 2 * m ** 3 / t, "card": torch.cuda.get_device_name()}


def load_config(model_dir: str) -> dict:
    """config.json of a HF model directory (or a config .json file)."""
    path = Path(model_dir)
    return json.loads((path if path.suffix == ".json" else path / "config.json").read_text())


def roofline_line(name: str, elapsed_s: float, prompt_lens: list[int], output_lens: list[int], cfg: dict,
                  device: dict) -> str:
    """One printed line: the workload's bound and the fraction of it this run reached."""
    b = bound_seconds(prompt_lens, output_lens, model_costs(cfg), device["copy_bw"], device["bf16_rate"])
    return (f"roofline {name}: bound {b['bound_s']:.3f} s (prefill {b['prefill_s']:.3f} s compute, decode "
            f"{b['decode_s']:.3f} s bandwidth) vs {elapsed_s:.3f} s measured: {100 * b['bound_s'] / elapsed_s:.1f}% "
            f"of the bound on {device['card']}")

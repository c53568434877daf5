"""GPU benchmark: pagedllm against the card's roofline and HF transformers, in one run.

Workloads (random weights of a real shape, bf16, ignore_eos):
  mix256   256 requests, prompt lengths uniform in [100, 1024] (seed 0, random token ids), 256 output tokens each
  latency  batch 1, a 1,024-token prompt, 128 output tokens: time to first token, ms per output token
  hf       HF transformers `generate_batch` (attn_implementation="paged|sdpa") on mix256
Roofline: the card's copy bandwidth and bf16 matmul rate measured in the same run; the bound of a workload is
its prefill FLOPs over the matmul rate plus each decode step's bytes (weights + KV read) over bandwidth.

Each part runs in its own subprocess so memory is clean. Usage (on a GPU box, from the repo root):
    PYTHONPATH=. python3 benchmarks/bench_gpu.py [--config benchmarks/configs/llama-3-8b] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "llama-3-8b"


def mix256_prompts(vocab_size: int, num: int = 256, lo: int = 100, hi: int = 1024, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(num)]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


# ---- model arithmetic -------------------------------------------------------------
def model_costs(cfg: dict) -> dict[str, float]:
    h, L, V, I = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    per_layer = h * (nh * hd) + 2 * h * (nkv * hd) + (nh * hd) * h + 3 * h * I
    matmul_params = L * per_layer  # per token through the layers
    lm_head = h * V
    total_params = matmul_params + lm_head + (0 if cfg.get("tie_word_embeddings") else h * V)
    return {
        "weight_bytes": 2 * total_params - 2 * h * V * (0 if cfg.get("tie_word_embeddings") else 1) + 0,
        "layer_flops_per_token": 2 * matmul_params,
        "lm_head_flops": 2 * lm_head,
        "kv_bytes_per_token": L * 2 * nkv * hd * 2,
        "attn_flops_per_pair": L * 4 * nh * hd,  # QK^T and PV, per (query, key) pair
        "total_params": total_params,
    }


def bound_seconds(prompt_lens: list[int], out_len: int, costs: dict, bw: float, rate: float) -> dict[str, float]:
    """Prefill FLOPs over the matmul rate + each decode step's bytes over bandwidth.

    The embedding table is a lookup, not read whole; the weight bytes per decode step
    count every matrix once (lm_head included)."""
    prefill_flops = sum(costs["layer_flops_per_token"] * p + costs["attn_flops_per_pair"] * p * (p + 1) / 2
                        + costs["lm_head_flops"] for p in prompt_lens)
    prefill_s = prefill_flops / rate
    decode_s, decode_compute_s = 0.0, 0.0
    for j in range(1, out_len):  # the first token comes from the prefill
        kv = sum(p + j for p in prompt_lens) * costs["kv_bytes_per_token"]
        decode_s += (costs["weight_bytes"] + kv) / bw
        decode_compute_s += len(prompt_lens) * (costs["layer_flops_per_token"] + costs["lm_head_flops"]) / rate
    return {"prefill_s": prefill_s, "decode_s": decode_s, "bound_s": prefill_s + decode_s,
            "decode_compute_s": decode_compute_s}


# ---- parts (each in its own process) ------------------------------------------------
def part_roofline() -> dict:
    import torch
    import triton

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


def _llm(config: str, **kw):
    from pagedllm import LLM

    return LLM(model=config, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, **kw)


def part_mix256(config: str, enforce_eager: bool) -> dict:
    from pagedllm import SamplingParams

    cfg = json.loads((Path(config) / "config.json").read_text())
    prompts = mix256_prompts(cfg["vocab_size"])
    llm = _llm(config, max_num_seqs=256, max_model_len=2048, enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prof = llm.engine.executor.worker.memory_profile
    kv = llm.engine.scheduler.kv_cache_manager
    return {"elapsed": elapsed, "output_tokens": out_tokens, "prompt_tokens": sum(map(len, prompts)),
            "num_blocks": kv.num_blocks, "preemptions": llm.engine.scheduler.num_preemptions,
            "memory_profile": prof}


def part_latency(config: str, enforce_eager: bool) -> dict:
    from pagedllm import SamplingParams

    cfg = json.loads((Path(config) / "config.json").read_text())
    prompt = mix256_prompts(cfg["vocab_size"], num=1, lo=1024, hi=1024, seed=1)[0]
    llm = _llm(config, max_num_seqs=8, max_model_len=2048, enforce_eager=enforce_eager)
    eng = llm.engine
    results = []
    for rep in range(3):
        eng.add_request(f"lat{rep}", prompt, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
        t0 = time.perf_counter()
        first = None
        while eng.has_unfinished_requests():
            outs = eng.step()
            if first is None and outs and outs[0].outputs[0].token_ids:
                first = time.perf_counter()
        end = time.perf_counter()
        results.append({"ttft": first - t0, "tpot": (end - first) / 127})
        eng.scheduler.kv_cache_manager.reset_prefix_cache()
    best = min(results[1:], key=lambda r: r["tpot"])
    return best


def part_hf(config: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(config)
    prompts = mix256_prompts(cfg.vocab_size)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=None, pad_token_id=0,
                           use_cuda_graph=False)
    model.generate_batch(inputs=prompts[:4], generation_config=gen)  # warm up
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gen)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(r.generated_tokens) for r in res.values())
    return {"elapsed": elapsed, "output_tokens": out_tokens}


# ---- orchestration -----------------------------------------------------------------
def run_part(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--config", str(args.config)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.part_timeout)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace) -> None:
    cfg = json.loads((Path(args.config) / "config.json").read_text())
    costs = model_costs(cfg)
    roof = run_part("roofline", args)
    bw, rate = roof["copy_bw"], roof["bf16_rate"]
    print(f"card: {roof['card']}  copy bandwidth {bw / 1e12:.2f} TB/s  bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    rows = []
    mix = run_part("mix256", args)
    lens = [len(p) for p in mix256_prompts(cfg["vocab_size"])]
    b = bound_seconds(lens, 256, costs, bw, rate)
    if "error" not in mix:
        out_tps = mix["output_tokens"] / mix["elapsed"]
        tot_tps = (mix["output_tokens"] + mix["prompt_tokens"]) / mix["elapsed"]
        bound_tps = 256 * 256 / b["bound_s"]
        rows.append(("mix256 pagedllm", f"{out_tps:,.0f} out tok/s", f"{tot_tps:,.0f} total tok/s",
                     f"bound {bound_tps:,.0f} out tok/s", f"{100 * out_tps / bound_tps:.1f}% of bound"))
        prof = mix["memory_profile"]
        if prof:
            left = prof["total"] - prof["weights"] - (prof["peak_torch"] - prof["weights"]) - prof["non_torch"]
            kv_bytes = mix["num_blocks"] * 16 * costs["kv_bytes_per_token"]
            rows.append(("kv cache", f"{kv_bytes / 2**30:.1f} GiB", f"{mix['num_blocks']} blocks",
                         f"left after weights+act {left / 2**30:.1f} GiB", f"{100 * kv_bytes / left:.1f}%"))
    else:
        rows.append(("mix256 pagedllm", "ERROR", mix["error"][-300:], "", ""))
    print(f"mix256 bound: prefill {b['prefill_s']:.2f}s + decode {b['decode_s']:.2f}s "
          f"(decode compute alone {b['decode_compute_s']:.2f}s)")
    lat = run_part("latency", args)
    if "error" not in lat:
        ttft_bound = bound_seconds([1024], 1, costs, bw, rate)["prefill_s"]
        tpot_bound = (costs["weight_bytes"] + 1100 * costs["kv_bytes_per_token"]) / bw
        rows.append(("latency b=1", f"TTFT {1e3 * lat['ttft']:.1f} ms", f"{1e3 * lat['tpot']:.2f} ms/tok",
                     f"bound {1e3 * ttft_bound:.1f} ms / {1e3 * tpot_bound:.2f} ms/tok",
                     f"decode {100 * tpot_bound / lat['tpot']:.1f}% of bw bound"))
    else:
        rows.append(("latency b=1", "ERROR", lat["error"][-300:], "", ""))
    if not args.skip_hf:
        hf = run_part("hf", args)
        if "error" not in hf:
            hf_tps = hf["output_tokens"] / hf["elapsed"]
            ratio = (mix["output_tokens"] / mix["elapsed"]) / hf_tps if "error" not in mix else float("nan")
            rows.append(("mix256 HF paged|sdpa", f"{hf_tps:,.0f} out tok/s", f"{hf['elapsed']:.1f} s",
                         f"pagedllm / HF = {ratio:.1f}x", ""))
        else:
            rows.append(("mix256 HF", "ERROR", hf["error"][-300:], "", ""))
    print("\n| workload | result | | bound | fraction |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--part", default=None, choices=["roofline", "mix256", "latency", "hf"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--part-timeout", type=int, default=400)
    args = ap.parse_args()
    if args.part is None:
        report(args)
        return
    fn = {"roofline": part_roofline, "mix256": lambda: part_mix256(args.config, args.enforce_eager),
          "latency": lambda: part_latency(args.config, args.enforce_eager), "hf": lambda: part_hf(args.config)}
    print(json.dumps(fn[args.part]()))


if __name__ == "__main__":
    main()

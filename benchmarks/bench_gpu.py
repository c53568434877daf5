"""GPU benchmark: pagedllm against the card's roofline and HF transformers, in one run.

Workloads (random weights of a real shape, bf16, ignore_eos):
  mix256   256 requests, prompt lengths uniform in [100, 1024] (seed 0, random token ids), 256 output tokens each
  latency  batch 1, a 1,024-token prompt, 128 output tokens: time to first token, ms per output token
  hf       HF transformers `generate_batch` (attn_implementation="paged|sdpa") on mix256
Roofline: the card's copy bandwidth and bf16 matmul rate measured in the same run; the bound of a workload is
its prefill FLOPs over the matmul rate plus each decode step's bytes (weights + KV read) over bandwidth.

Each part runs in its own subprocess so memory is clean; each prints one JSON line. The engine parts also
report where the step time goes (scheduler, runner host work before the forward is queued, the rest of
execute_model, which waits for the GPU, and the engine's output handling), for decode-only and mixed steps.

A thin user of ``pagedllm.bench`` (dataset, roofline); ``--serve`` (or ``--part serve``) adds the same mix256
load through ``pagedllm serve`` (256 streaming clients) against offline in one call (``pagedllm bench serve
--compare-offline``).

Usage (on a GPU box, from the repo root):
    PYTHONPATH=. python3 benchmarks/bench_gpu.py [--config benchmarks/configs/llama-3-8b] [--skip-hf]
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --part mix256 --enforce-eager   # one part, JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from pagedllm.bench.datasets import mix256_prompts
from pagedllm.bench.roofline import bound_seconds, measure_device, model_costs

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "llama-3-8b"


# The dataset and the roofline arithmetic live in pagedllm.bench (shared with `pagedllm bench`).
def part_roofline() -> dict:
    return measure_device()


def _llm(config: str, **kw):
    from pagedllm import LLM

    return LLM(model=config, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, **kw)


class StepTimer:
    """Wraps the engine's step pieces and sums their wall time per kind of step."""

    def __init__(self, engine) -> None:
        self.rows: list[tuple[bool, int, float, float, float, float]] = []
        self._cur: dict[str, float] = {}
        runner = engine.executor.worker.model_runner
        # "prep": the persistent batch taking the scheduler's diff, then building the step's flat batch.
        for obj, name, key in ((engine.scheduler, "schedule", "sched"), (engine.executor, "execute_model", "exec"),
                               (runner, "_forward", "launch"), (runner.input_batch, "update_states", "prep"),
                               (runner.input_batch, "prepare", "prep"), (runner, "_sample", "sample")):
            setattr(obj, name, self._wrap(getattr(obj, name), key))
        self._step = engine.step
        engine.step = self.step

    def _wrap(self, fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self._cur[key] = self._cur.get(key, 0.0) + time.perf_counter() - t0
            if key == "launch":
                self._cur["decode_only"] = a[0].max_query_len == 1
                self._cur["num_reqs"] = len(a[0].req_ids)
            return out
        return timed

    def step(self):
        self._cur = {}
        t0 = time.perf_counter()
        out = self._step()
        total = time.perf_counter() - t0
        c = self._cur
        if "launch" in c:
            self.rows.append((c["decode_only"], c["num_reqs"], total, c["sched"], c["exec"], c["launch"],
                              c.get("prep", 0.0), c.get("sample", 0.0)))
        return out

    def summary(self) -> dict:
        """Per kind of step: count, requests, and mean ms of step / schedule / host prep+launch / exec / engine."""
        groups = defaultdict(list)
        for decode_only, *row in self.rows:
            groups["decode" if decode_only else "mixed"].append(row)
        out = {}
        for kind, rows in groups.items():
            k = len(rows)
            n, step, sched, exe, launch, prep, sample = (sum(r[i] for r in rows) / k for i in range(7))
            out[kind] = {"steps": k, "reqs": round(n, 1), "step_ms": 1e3 * step, "sched_ms": 1e3 * sched,
                         "exec_ms": 1e3 * exe, "prep_ms": 1e3 * prep, "launch_ms": 1e3 * launch,
                         "sample_ms": 1e3 * sample, "engine_ms": 1e3 * (step - sched - exe),
                         "total_s": sum(r[1] for r in rows)}
        return out


def _warm_up(llm, prompts: list[list[int]]) -> None:
    """The same prompts with 2 output tokens before the timed run (the prefix cache is reset after).

    Triton compiles a kernel per tile size and per integer-argument specialisation (== 1, multiple
    of 16); a 40-prompt mini-mix still left one compile (~1 s) inside the timed run, and the same
    batches as the timed prefill phase leave none. Decode batches run CUDA graphs captured at start."""
    from pagedllm import SamplingParams

    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    for n in (1000, 100, 7, 3):  # prefill-only steps of each tile size
        llm.generate([prompts[0][:n], prompts[1][:n]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                     use_tqdm=False)


def _triton_cache_entries() -> int:
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def part_mix256(config: str, enforce_eager: bool, num: int, out_len: int) -> dict:
    from pagedllm import SamplingParams

    cfg = json.loads((Path(config) / "config.json").read_text())
    prompts = mix256_prompts(cfg["vocab_size"], num=num)
    t_init = time.perf_counter()
    llm = _llm(config, max_num_seqs=256, max_model_len=2048, enforce_eager=enforce_eager)
    init_s = time.perf_counter() - t_init
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    _warm_up(llm, prompts)
    llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
    timer = StepTimer(llm.engine)
    compiled = _triton_cache_entries()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    compiled = _triton_cache_entries() - compiled
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed": elapsed, "output_tokens": out_tokens, "prompt_tokens": sum(map(len, prompts)),
            "num_blocks": llm.engine.scheduler.kv_cache_manager.block_pool.num_blocks,
            "block_size": llm.engine.cache_config.block_size,
            "preemptions": llm.engine.scheduler.num_preemptions, "init_s": init_s,
            "memory_profile": llm.engine.executor.worker.memory_profile, "steps": timer.summary(),
            "triton_compiles_in_timed_run": compiled}


def part_latency(config: str, enforce_eager: bool) -> dict:
    from pagedllm import SamplingParams

    cfg = json.loads((Path(config) / "config.json").read_text())
    prompt = mix256_prompts(cfg["vocab_size"], num=1, lo=1024, hi=1024, seed=1)[0]
    llm = _llm(config, max_num_seqs=8, max_model_len=2048, enforce_eager=enforce_eager)
    eng = llm.engine
    results = []
    timer = None
    for rep in range(3):
        if rep == 2:
            timer = StepTimer(eng)
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
    return {**best, "runs": results, "steps": timer.summary()}


def part_hf(config: str, num: int, out_len: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(config)
    prompts = mix256_prompts(cfg.vocab_size, num=num)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model.eval()
    # HF's own defaults for continuous batching (cache size, CUDA graphs); EOS off as in ignore_eos.
    gen = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[p[:64] for p in prompts[:4]], generation_config=gen)  # warm up
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gen)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(r.generated_tokens) for r in res.values())
    return {"elapsed": elapsed, "output_tokens": out_tokens, "transformers": __import__("transformers").__version__}


def _layer_inputs(num_seqs: int, q_len: int, ctx: int, hidden: int, block: int = 16):
    """(positions, hidden, metadata) for num_seqs sequences of ctx tokens whose last q_len are new."""
    import torch

    from pagedllm.attention.backend import AttentionMetadata

    n, width = num_seqs * q_len, ctx // block
    tables = torch.arange(num_seqs * width, dtype=torch.int32, device="cuda").view(num_seqs, width)
    pos = torch.arange(n, device="cuda") % q_len + ctx - q_len
    seq = torch.arange(n, device="cuda") // q_len
    md = AttentionMetadata(
        slot_mapping=tables[seq, pos // block].long() * block + pos % block, block_tables=tables,
        seq_lens=torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda") * q_len,
        max_query_len=q_len, max_seq_len=ctx, num_actual_tokens=n)
    return pos, torch.randn(n, hidden, device="cuda") * 0.1, md


def _time_decode_graph(layer, pos, x, kv, md, calls: int = 8) -> float:
    """Microseconds per layer call, from a CUDA graph of ``calls`` chained calls."""
    import torch
    import triton

    def chain():
        h, r = x, x
        for _ in range(calls):
            h, r = layer(pos, h, r, kv, md)
        return h

    chain()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median") / calls


def _kernel_breakdown(fn, iters: int = 20) -> dict[str, float]:
    """Mean GPU microseconds per call of ``fn`` for each kernel name (torch.profiler, eager launches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        times[e.key[:70]] += total / iters
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:14])


def part_fused(config: str) -> dict:
    """Decoder-layer time with the fused Triton element-wise kernels on and off (select_kernels).

    Decode: a CUDA graph of 8 chained layer calls at batch 1 and 256 (context 640); prefill: one
    eager layer call on 8 x 1024 new tokens. Microseconds per layer call."""
    import torch
    import triton
    from transformers import AutoConfig

    from pagedllm.attention.backend import get_backend
    from pagedllm.models.layers.kernels import select_kernels
    from pagedllm.models.layers.rotary import RotaryEmbedding, rope_parameters
    from pagedllm.models.llama import LlamaDecoderLayer, get_head_dim

    cfg = AutoConfig.from_pretrained(config)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        theta, scaling = rope_parameters(cfg)
        rope = RotaryEmbedding(get_head_dim(cfg), cfg.max_position_embeddings, theta, scaling)
        layer = LlamaDecoderLayer(cfg, rope, get_backend("triton"))
    for name, p in layer.named_parameters():
        p.data.fill_(1.0) if "norm" in name else p.data.uniform_(-0.02, 0.02)
    kv = torch.zeros(256 * 640 // 16, 2, 16, cfg.num_key_value_heads, get_head_dim(cfg), device="cuda")
    out = {}
    for fused in ("1", "0"):
        select_kernels(layer, "cuda", fused=fused == "1")
        with torch.inference_mode():
            for bs in (1, 256):
                pos, x, md = _layer_inputs(bs, 1, 640, cfg.hidden_size)
                out[f"decode_bs{bs}_fused{fused}_us"] = _time_decode_graph(layer, pos, x, kv, md)
            pos, x, md = _layer_inputs(8, 1024, 1024, cfg.hidden_size)
            t = triton.testing.do_bench(lambda p=pos, h=x, m=md: layer(p, h, h, kv, m), warmup=5, rep=50,
                                        return_mode="median")
            out[f"prefill_8x1024_fused{fused}_us"] = 1e3 * t
    select_kernels(layer, "cuda", fused=True)
    with torch.inference_mode():
        for bs in (1, 256):  # where a decode layer's GPU time goes, kernel by kernel
            pos, x, md = _layer_inputs(bs, 1, 640, cfg.hidden_size)
            try:
                out[f"kernels_decode_bs{bs}_us"] = _kernel_breakdown(lambda p=pos, h=x, m=md: layer(p, h, h, kv, m))
            except Exception as e:  # the profiler's API moves between torch versions; keep the timings
                out[f"kernels_decode_bs{bs}_us"] = {"error": repr(e)[:200]}
        w = layer.mlp.gate_up_proj.weight  # the largest matrix: achieved bandwidth of a batch-1 GEMV
        x1 = torch.randn(1, w.shape[1], device="cuda")
        t = triton.testing.do_bench(lambda: torch.nn.functional.linear(x1, w), warmup=20, rep=200,
                                    return_mode="median") / 1e3
        out["gemv_gate_up_bs1_GBps"] = w.numel() * w.element_size() / t / 1e9
    return out


def part_serve(config: str, enforce_eager: bool, num: int, out_len: int) -> dict:
    """mix256 through `pagedllm serve` (num streaming clients) and offline, in one `pagedllm bench serve` call.

    The server has no tokenizer (dummy weights), so clients ask for logprobs=0 to get every token streamed;
    the offline run asks for them too, so the two compare like for like."""
    import tempfile

    server = ["--model", config, "--load-format", "dummy", "--dtype", "bfloat16", "--skip-tokenizer-init",
              "--max-model-len", "2048", "--max-num-seqs", "256", *(["--enforce-eager"] if enforce_eager else [])]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "pagedllm.cli", "bench", "serve", "--launch", "--server-args", " ".join(server),
               "--dataset", "mix256", "--num-prompts", str(num), "--output-len", str(out_len), "--concurrency",
               str(num), "--logprobs", "0", "--compare-offline", "--no-progress", "--json", out.name]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        result = json.loads(Path(out.name).read_text())
    serve, offline = result["serve"][0], result["offline"]
    return {"serve_out_tps": serve["output_throughput"], "offline_out_tps": offline["output_throughput"],
            "ttft_p50_ms": serve["ttft_ms"]["p50"], "itl_p50_ms": serve["itl_ms"]["p50"],
            "failed": serve["num_failed"]}


# ---- orchestration -----------------------------------------------------------------
def run_part(name: str, args: argparse.Namespace, enforce_eager: bool | None = None) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--config", str(args.config), "--num-requests",
           str(args.num_requests), "--output-len", str(args.output_len)]
    if args.enforce_eager if enforce_eager is None else enforce_eager:
        cmd.append("--enforce-eager")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.part_timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {args.part_timeout}s: {str(e.stderr or '')[-1500:]}"}
    sys.stderr.write(f"--- part {name}{' (eager)' if '--enforce-eager' in cmd else ''}: "
                     f"{time.perf_counter() - t0:.0f}s, rc {proc.returncode}\n{proc.stderr[-3000:]}\n")
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def _steps_table(label: str, steps: dict) -> list[str]:
    lines = []
    for kind, s in steps.items():
        lines.append(f"| {label} {kind} | {s['steps']} | {s['reqs']} | {s['step_ms']:.2f} | {s['sched_ms']:.2f} | "
                     f"{s['exec_ms']:.2f} | {s['prep_ms']:.2f} | {s['launch_ms']:.2f} | {s['sample_ms']:.2f} | "
                     f"{s['engine_ms']:.2f} | {s['total_s']:.2f} |")
    return lines


def _fused_lines(fused: dict, num_layers: int) -> list[str]:
    if "error" in fused:
        return [f"fused ops part failed: {fused['error'][-300:]}"]
    lines = []
    for key in ("decode_bs1", "decode_bs256", "prefill_8x1024"):
        on, off = fused[f"{key}_fused1_us"], fused[f"{key}_fused0_us"]
        lines.append(f"fused ops, {key}: {on:.1f} us per layer fused vs {off:.1f} us torch ({off / on:.2f}x; "
                     f"x{num_layers} layers: {(off - on) * num_layers / 1e3:.2f} ms per step saved)")
    lines.append(f"batch-1 GEMV (gate_up, bf16): {fused['gemv_gate_up_bs1_GBps']:.0f} GB/s")
    for bs in (1, 256):
        kernels = fused[f"kernels_decode_bs{bs}_us"]
        lines.append(f"decode layer kernels, batch {bs} (us per layer): " + "; ".join(
            f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in kernels.items()))
    return lines


def report(args: argparse.Namespace) -> None:
    cfg = json.loads((Path(args.config) / "config.json").read_text())
    costs = model_costs(cfg)
    roof = run_part("roofline", args)
    bw, rate = roof["copy_bw"], roof["bf16_rate"]
    print(f"card: {roof['card']}  copy bandwidth {bw / 1e12:.2f} TB/s  bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    rows, step_lines = [], []
    mix = run_part("mix256", args)
    if "error" in mix and not args.enforce_eager:
        mix = run_part("mix256", args, enforce_eager=True)  # still measure something; the table says eager
        mix["eager_fallback"] = True
    lens = [len(p) for p in mix256_prompts(cfg["vocab_size"], num=args.num_requests)]
    b = bound_seconds(lens, args.output_len, costs, bw, rate)
    if "error" not in mix:
        out_tps = mix["output_tokens"] / mix["elapsed"]
        tot_tps = (mix["output_tokens"] + mix["prompt_tokens"]) / mix["elapsed"]
        bound_tps = len(lens) * args.output_len / b["bound_s"]
        label = "mix256 pagedllm" + (" (EAGER fallback)" if mix.get("eager_fallback") else "")
        label += f" ({mix['triton_compiles_in_timed_run']} Triton compiles in the timed run)"
        rows.append((label, f"{out_tps:,.0f} out tok/s", f"{tot_tps:,.0f} total tok/s ({mix['elapsed']:.2f} s)",
                     f"{bound_tps:,.0f} out tok/s ({b['bound_s']:.2f} s)", f"{100 * out_tps / bound_tps:.1f}%"))
        prof = mix["memory_profile"]
        if prof:
            left = prof["total"] - prof["peak_torch"] - prof["non_torch"]
            kv_bytes = mix["num_blocks"] * mix["block_size"] * costs["kv_bytes_per_token"]
            rows.append(("KV cache", f"{kv_bytes / 2**30:.1f} GiB", f"{mix['num_blocks']} blocks; weights "
                         f"{prof['weights'] / 2**30:.1f} GiB, peak {prof['peak_torch'] / 2**30:.1f} GiB",
                         f"left after weights+act {left / 2**30:.1f} GiB", f"{100 * kv_bytes / left:.1f}%"))
        step_lines += _steps_table("mix256", mix["steps"])
    else:
        rows.append(("mix256 pagedllm", "ERROR", mix["error"][-300:].replace("\n", " "), "", ""))
    print(f"mix256 bound: prefill {b['prefill_s']:.2f}s + decode {b['decode_s']:.2f}s "
          f"(decode compute alone {b['decode_compute_s']:.2f}s)")
    lat = run_part("latency", args)
    if "error" not in lat:
        ttft_bound = bound_seconds([1024], 1, costs, bw, rate)["prefill_s"]
        tpot_bound = costs["weight_bytes"] / bw  # the bound: weight bytes over bandwidth
        rows.append(("latency b=1", f"TTFT {1e3 * lat['ttft']:.1f} ms; {1e3 * lat['tpot']:.2f} ms/tok",
                     f"{1 / lat['tpot']:.0f} tok/s", f"TTFT {1e3 * ttft_bound:.1f} ms; {1e3 * tpot_bound:.2f} ms/tok",
                     f"decode {100 * tpot_bound / lat['tpot']:.1f}%"))
        step_lines += _steps_table("latency", lat["steps"])
    else:
        rows.append(("latency b=1", "ERROR", lat["error"][-300:].replace("\n", " "), "", ""))
    if args.serve:
        srv = run_part("serve", args)
        if "error" not in srv:
            rows.append((f"mix256 through serve ({args.num_requests} streaming clients)",
                         f"{srv['serve_out_tps']:,.0f} out tok/s", f"TTFT p50 {srv['ttft_p50_ms']:.0f} ms, ITL p50 "
                         f"{srv['itl_p50_ms']:.1f} ms, {srv['failed']} failed",
                         f"offline same call {srv['offline_out_tps']:,.0f}",
                         f"{100 * srv['serve_out_tps'] / srv['offline_out_tps']:.1f}% of offline"))
        else:
            rows.append(("mix256 through serve", "ERROR", srv["error"][-300:].replace("\n", " "), "", ""))
    if not args.skip_fused:
        step_lines += _fused_lines(run_part("fused", args), cfg["num_hidden_layers"])
    if not args.skip_hf:
        hf = run_part("hf", args)
        if "error" not in hf:
            hf_tps = hf["output_tokens"] / hf["elapsed"]
            ratio = (mix["output_tokens"] / mix["elapsed"]) / hf_tps if "error" not in mix else float("nan")
            rows.append((f"mix256 HF {hf['transformers']} paged|sdpa", f"{hf_tps:,.0f} out tok/s",
                         f"{hf['elapsed']:.1f} s, {hf['output_tokens']} tokens", "", f"pagedllm = {ratio:.1f}x HF"))
        else:
            rows.append(("mix256 HF", "ERROR", hf["error"][-300:].replace("\n", " "), "", ""))
    print("\n| workload | result | | bound | fraction |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nWhere the step time goes (mean ms per step; exec includes the wait for the GPU):\n")
    print("| steps | count | reqs | step | schedule | execute_model | of which: batch prep | load + launch | "
          "logits + sample + sync | engine out | total s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(line for line in step_lines if line.startswith("|")))
    print("\n" + "\n".join(line for line in step_lines if not line.startswith("|")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--part", default=None, choices=["roofline", "mix256", "latency", "fused", "hf", "serve"])
    ap.add_argument("--serve", action="store_true", help="also mix256 through `pagedllm serve` vs offline")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-fused", action="store_true", help="skip the fused-kernel ablation")
    ap.add_argument("--num-requests", type=int, default=256, help="mix256 size (smaller only for smoke tests)")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--part-timeout", type=int, default=300)
    args = ap.parse_args()
    if args.part is None:
        report(args)
        return
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # memory profile, graph capture
    fn = {"roofline": part_roofline,
          "mix256": lambda: part_mix256(args.config, args.enforce_eager, args.num_requests, args.output_len),
          "latency": lambda: part_latency(args.config, args.enforce_eager), "fused": lambda: part_fused(args.config),
          "hf": lambda: part_hf(args.config, args.num_requests, args.output_len),
          "serve": lambda: part_serve(args.config, args.enforce_eager, args.num_requests, args.output_len)}
    print(json.dumps(fn[args.part]()))


if __name__ == "__main__":
    main()

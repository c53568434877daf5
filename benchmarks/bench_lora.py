"""Multi-LoRA serving speed on one GPU: mix256 with 1, 8 and 32 distinct adapters against the base model.

    PYTHONPATH=. python3 benchmarks/bench_lora.py [--model benchmarks/configs/llama-3-8b] [--rank 16]

Llama-3-8B shape, dummy bf16 weights, rank-16 random adapters on all seven projections
(``pagedllm.lora.dummy``), greedy with ignore_eos. In one run: the base model in an engine
without LoRA, then an engine with ``--enable-lora --max-loras 32`` running mix256 with no
adapter, 1, 8 and 32 adapters (requests spread round-robin), and batch-1 decode (TPOT) with
and without an adapter. Prints one table and a JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.bench.datasets import mix256_prompts
from pagedllm.lora.dummy import write_random_adapter


def _mix256(llm: LLM, prompts: list[list[int]], output_len: int, loras: list[LoRARequest | None]) -> float:
    """Output tok/s of all prompts at once, adapter i % len(loras) on prompt i."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    reqs = [loras[i % len(loras)] for i in range(len(prompts))]
    llm.generate(prompts[:4], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=reqs[:4])  # warm-up
    llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=reqs)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def _tpot_ms(llm: LLM, prompt: list[int], lora: LoRARequest | None, output_len: int = 128) -> float:
    """Batch-1 decode: ms per output token after the first (median of 3)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    times = []
    for it in range(4):
        engine.add_request(f"b1-{it}-{time.monotonic()}", prompt, params, lora_request=lora)
        engine.step()  # the prefill and first token
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append((time.perf_counter() - t0) / (output_len - 1) * 1e3)
    return sorted(times[1:])[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--adapters", default="1,8,32")
    p.add_argument("--adapter-dir", default=None, help="where the random adapters go (default: a temp dir)")
    args = p.parse_args()
    counts = [int(c) for c in args.adapters.split(",")]
    common = dict(model=args.model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True)

    llm = LLM(**common)
    vocab = llm.engine.model_config.hf_config.vocab_size
    prompts = mix256_prompts(vocab, num=args.num_prompts)
    results = {"base_engine": {"mix256": _mix256(llm, prompts, args.output_len, [None]),
                               "tpot_ms": _tpot_ms(llm, prompts[0][:128], None)}}
    hf_config = llm.engine.model_config.hf_config
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    root = args.adapter_dir or tempfile.mkdtemp(prefix="pagedllm-lora-")
    t0 = time.perf_counter()
    loras = [LoRARequest(f"a{i}", i + 1, write_random_adapter(os.path.join(root, f"a{i}"), hf_config, args.rank,
                                                              seed=i))
             for i in range(max(counts))]
    print(f"wrote {len(loras)} adapters in {time.perf_counter() - t0:.1f} s")
    llm = LLM(**common, enable_lora=True, max_loras=max(counts), max_lora_rank=args.rank)
    lora_runs = {"no adapter": _mix256(llm, prompts, args.output_len, [None])}
    for n in counts:
        lora_runs[f"{n} adapters"] = _mix256(llm, prompts, args.output_len, loras[:n])
    results["lora_engine"] = {"mix256": lora_runs, "tpot_ms": _tpot_ms(llm, prompts[0][:128], None),
                              "tpot_ms_adapter": _tpot_ms(llm, prompts[0][:128], loras[0])}
    base, base_tpot = results["base_engine"]["mix256"], results["base_engine"]["tpot_ms"]
    print(f"{'mix256 (output tok/s)':<28}{'tok/s':>10}{'x base':>8}")
    print(f"{'base engine (no LoRA)':<28}{base:>10.0f}{1.0:>8.2f}")
    for name, tps in lora_runs.items():
        print(f"{'LoRA engine, ' + name:<28}{tps:>10.0f}{tps / base:>8.2f}")
    print(f"{'batch-1 TPOT (ms)':<28}{'ms':>10}{'x base':>8}")
    for name, ms in (("base engine", base_tpot), ("LoRA engine, no adapter", results["lora_engine"]["tpot_ms"]),
                     ("LoRA engine, 1 adapter", results["lora_engine"]["tpot_ms_adapter"])):
        print(f"{name:<28}{ms:>10.2f}{ms / base_tpot:>8.2f}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rank": args.rank, **results}))


if __name__ == "__main__":
    main()

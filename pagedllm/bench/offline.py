"""Offline benchmarks through ``LLM``: throughput (a whole dataset at once) and latency (one batch, repeated)."""

from __future__ import annotations

import time
from typing import Any

from pagedllm.bench.datasets import BenchRequest
from pagedllm.bench.metrics import summarize


def _params(output_len: int, logprobs: int | None = None) -> Any:
    from pagedllm.sampling_params import SamplingParams

    # Greedy and EOS ignored: every request produces exactly output_len tokens, run after run.
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, logprobs=logprobs)


def warm_up(llm: Any, requests: list[BenchRequest]) -> None:
    """A few short requests first: lazy initialisation and kernel compiles stay out of the timing."""
    sample = requests[: min(len(requests), 4)]
    llm.generate([r.prompt_token_ids for r in sample], [_params(2) for _ in sample], use_tqdm=False)
    llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()


def throughput(llm: Any, requests: list[BenchRequest], progress: bool = True,
               logprobs: int | None = None) -> dict[str, float]:
    """All requests through ``LLM.generate`` at once: request/s, output tok/s, total tok/s.

    ``logprobs``: ask for them as a serve run with ``--logprobs`` does, so that the two compare like for like.
    """
    warm_up(llm, requests)
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests],
                        [_params(r.output_len, logprobs) for r in requests], use_tqdm=progress)
    elapsed = time.perf_counter() - t0
    output_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {"elapsed_s": elapsed, "num_requests": len(requests), "output_tokens": output_tokens,
            "prompt_tokens": prompt_tokens, "request_throughput": len(requests) / elapsed,
            "output_throughput": output_tokens / elapsed,
            "total_throughput": (output_tokens + prompt_tokens) / elapsed}


def latency(llm: Any, requests: list[BenchRequest], num_iters: int = 3, num_iters_warmup: int = 1,
            progress: bool = True) -> dict[str, Any]:
    """One batch (``requests``) end to end, ``num_iters`` times: latency percentiles, TTFT and TPOT."""
    from tqdm import tqdm

    engine = llm.engine
    warm_up(llm, requests)
    latencies, ttfts, tpots = [], [], []
    for it in tqdm(range(num_iters_warmup + num_iters), desc="latency iterations", disable=not progress):
        for i, r in enumerate(requests):
            engine.add_request(f"lat{it}-{i}", r.prompt_token_ids, _params(r.output_len))
        t0 = time.perf_counter()
        first: float | None = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and any(c.token_ids for o in outs for c in o.outputs):
                first = time.perf_counter()
        end = time.perf_counter()
        engine.scheduler.kv_cache_manager.reset_prefix_cache()  # each iteration computes its prompts
        if it < num_iters_warmup:
            continue
        latencies.append(end - t0)
        first = first if first is not None else end
        ttfts.append(first - t0)
        steps = max(max(r.output_len for r in requests) - 1, 1)
        tpots.append((end - first) / steps)
    return {"batch_size": len(requests), "num_iters": num_iters, "latency_ms": summarize(latencies),
            "ttft_ms": summarize(ttfts), "tpot_ms": summarize(tpots)}

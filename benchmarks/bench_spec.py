"""Speculative decoding benchmark: n-gram speculation against plain decoding, ratios measured in one run.

CPU (default): the default model, batch 1, greedy, through the chat template.
  grounded  benchmarks/data/spec_grounded.json: extract / rewrite / quote / code-edit prompts whose answers copy
            spans of the prompt (where prompt lookup should win)
  chat      benchmarks/data/spec_chat.json: open-ended questions (little to look up: the overhead case)
  For each prompt the plain and the speculating engine run back to back (alternating which goes first), so a
  busy machine slows both alike; reported: ms per output token (decode phase: first token to last) for each,
  their ratio, the acceptance rate and the mean accepted length (tokens per verification, bonus included).

CUDA (--device cuda --config DIR): dummy weights of DIR's shape (bf16), random prompts of 512 tokens, CUDA graphs
  on. For batch 1 and 32: the mean step time of a plain decode, of a verification step with k = 1..8 drafts per
  request (a fixed proposer whose drafts the random model rejects: every step verifies k and emits one token),
  and of n-gram speculation on with nothing to find (its overhead). Prints one table; needs no fastapi.

    PYTHONPATH=. python benchmarks/bench_spec.py                                  # CPU
    PYTHONPATH=. python benchmarks/bench_spec.py --device cuda --config benchmarks/configs/llama-3-8b
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


# ---- CPU: per-token latency on shipped prompts -------------------------------------
def decode_ms_per_token(llm, prompt: str, max_tokens: int) -> tuple[float, int]:  # noqa: ANN001 - an LLM
    """(ms per output token after the first, output tokens) of one greedy request run alone."""
    from pagedllm import SamplingParams

    eng = llm.engine
    eng.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    first = end = None
    num_tokens = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            num_tokens = len(out.outputs[0].token_ids)
            if first is None and num_tokens:
                first = time.perf_counter()
            end = time.perf_counter()
    return 1000 * (end - first) / max(num_tokens - 1, 1), num_tokens


def run_cpu(args: argparse.Namespace) -> None:
    from pagedllm import LLM
    from pagedllm.engine.chat_utils import apply_chat_template

    plain = LLM(device="cpu", max_model_len=2048)
    spec = LLM(device="cpu", max_model_len=2048, speculative_config=NGRAM)
    tok = plain.engine.tokenizer
    print(f"{'workload':<9} {'prompts':>7} {'tokens':>7} {'plain ms/tok':>12} {'ngram ms/tok':>12} {'speedup':>8} "
          f"{'accept':>7} {'mean len':>8}")
    for name in ("grounded", "chat"):
        items = json.loads((HERE / "data" / f"spec_{name}.json").read_text())[:args.num_prompts]
        stats0 = spec.engine.scheduler.spec_stats.copy()
        plain_ms, spec_ms, tokens = [], [], 0
        for i, item in enumerate(items):
            prompt = apply_chat_template(tok, [{"role": "user", "content": item["prompt"]}])
            order = [(plain, plain_ms), (spec, spec_ms)]
            for llm, sink in (order if i % 2 == 0 else order[::-1]):
                ms, n = decode_ms_per_token(llm, prompt, args.max_tokens)
                sink.append(ms * (n - 1))
                tokens += n if llm is spec else 0
        s = spec.engine.scheduler.spec_stats
        drafts, draft_toks = s.num_drafts - stats0.num_drafts, s.num_draft_tokens - stats0.num_draft_tokens
        accepted = s.num_accepted_tokens - stats0.num_accepted_tokens
        denom = max(tokens - len(items), 1)
        p, q = sum(plain_ms) / denom, sum(spec_ms) / denom
        print(f"{name:<9} {len(items):>7} {tokens:>7} {p:>12.1f} {q:>12.1f} {p / q:>7.2f}x "
              f"{accepted / max(draft_toks, 1):>7.1%} {1 + accepted / max(drafts, 1):>8.2f}")


# ---- CUDA: cost of a verification step ------------------------------------------------
class FixedProposer:
    """Always drafts k copies of one token: with random weights they are rejected, so every step verifies k."""

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, requests: Sequence[Sequence[int]]) -> list[list[int]]:
        return [[7] * self.k for _ in requests]


def mean_step_ms(llm, batch: int, prompt_len: int, steps: int, vocab: int, k: int | None) -> float:  # noqa: ANN001
    """Mean decode-step time once every request is decoding; ``k`` installs a FixedProposer(k)."""
    from pagedllm import SamplingParams

    eng = llm.engine
    if k is not None:
        eng.executor.worker.model_runner.proposer = FixedProposer(k)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params)
    times = []
    while eng.has_unfinished_requests():
        start = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - start)
    # Skip the prefill steps and the first decodes (drafts start one step after the first token).
    return 1000 * statistics.median(times[-steps:])


def run_cuda(args: argparse.Namespace) -> None:
    import gc

    import torch

    from pagedllm import LLM

    vocab = json.loads((Path(args.config) / "config.json").read_text())["vocab_size"]
    common = dict(model=args.config, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  device="cuda", max_model_len=2048, max_num_seqs=64)
    batches = (1, 32)
    results: dict[int, dict[str, float]] = {b: {} for b in batches}
    # One engine at a time: each sizes its KV cache from the free GPU memory.
    for label, spec in (("plain", None), ("verify", {"method": "ngram", "num_speculative_tokens": 8}),
                        ("ngram idle", NGRAM)):
        llm = LLM(**common, speculative_config=spec)
        for batch in batches:
            ks = range(1, 9) if label == "verify" else [None]
            for k in ks:
                name = f"k={k}" if k else label
                results[batch][name] = mean_step_ms(llm, batch, args.prompt_len, args.steps, vocab, k)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print("step time / plain decode step time (dummy weights, bf16; plain decode runs as a CUDA graph, "
          "verification eagerly; 'ngram idle': n-gram on, random prompts, nothing to draft)")
    names = [n for n in results[1] if n != "plain"]
    print(f"{'batch':>6} {'plain ms':>9} " + " ".join(f"{n:>10}" for n in names))
    for batch, row in results.items():
        print(f"{batch:>6} {row['plain']:>9.2f} " + " ".join(f"{row[n] / row['plain']:>10.3f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default=str(HERE / "configs" / "llama-3-8b"), help="HF config dir (cuda)")
    parser.add_argument("--num-prompts", type=int, default=8, help="per CPU workload")
    parser.add_argument("--max-tokens", type=int, default=96, help="CPU output tokens per request")
    parser.add_argument("--prompt-len", type=int, default=512, help="cuda prompt length")
    parser.add_argument("--steps", type=int, default=40, help="cuda decode steps measured per point")
    args = parser.parse_args()
    run_cuda(args) if args.device == "cuda" else run_cpu(args)


if __name__ == "__main__":
    main()

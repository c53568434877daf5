"""How closely the CPU fast path (bf16 weights, `--dtype auto`) follows exact fp32 (`--dtype float32`).

Two numbers, both models in one run on the default model:
- greedy agreement: over `--num-prompts` prompts, the share whose first `--max-tokens` greedy tokens are
  identical, and the mean share of tokens before the first difference;
- perplexity of benchmarks/data/ppl_text.txt (prompt logprobs, one pass over the whole text).

The prompts run as one batch (decode steps of many sequences: bf16 weights) or, with `--alone`, one at a
time (batch-1 decode steps: a Q4_1 GGUF's int4 weights, what a single user gets).

    .venv/bin/python benchmarks/cpu_agreement.py [--num-prompts 64] [--max-tokens 32] [--alone]
"""

from __future__ import annotations

import argparse
import math
import os
import random

TEXT = os.path.join(os.path.dirname(__file__), "data", "ppl_text.txt")
TOPICS = ("the sea", "a small village", "rivers", "mountains", "tea", "robots", "history", "a lazy dog", "bread",
          "the moon", "trains", "music", "gardens", "winter", "a library", "bees")
FORMS = ("Write a short story about {}.", "Explain {} to a child.", "Here are three facts about {}:",
         "The most surprising thing about {} is", "Q: What do you know about {}?\nA:")


def prompts(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(FORMS).format(rng.choice(TOPICS)) for _ in range(num)]


def run(dtype: str, texts: list[str], max_tokens: int, alone: bool = False) -> tuple[list[list[int]], float]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(device="cpu", dtype=dtype, max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if alone:
        greedy = [llm.generate(t, params, use_tqdm=False)[0] for t in texts]
    else:
        greedy = llm.generate(texts, params, use_tqdm=False)
    with open(TEXT) as f:
        text = f.read()
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    return [o.outputs[0].token_ids for o in greedy], math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--alone", action="store_true", help="one prompt at a time (batch-1 decode steps)")
    args = ap.parse_args()
    texts = prompts(args.num_prompts)
    ref, ppl_ref = run("float32", texts, args.max_tokens, args.alone)
    fast, ppl_fast = run("auto", texts, args.max_tokens, args.alone)
    same = sum(a == b for a, b in zip(ref, fast))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a) for a, b in zip(ref, fast)]
    print(f"greedy: {same}/{len(texts)} prompts identical over {args.max_tokens} tokens; "
          f"mean agreeing prefix {sum(prefix) / len(prefix):.1%}")
    print(f"perplexity of {os.path.basename(TEXT)}: fp32 {ppl_ref:.3f}, fast path {ppl_fast:.3f} "
          f"({ppl_fast / ppl_ref - 1:+.2%})")


if __name__ == "__main__":
    main()

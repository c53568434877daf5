"""Constrained decoding overhead on the CPU: 32 concurrent requests with a JSON schema vs unconstrained.

The default model (SmolLM2-135M-Instruct GGUF, fp32), greedy. The schema forces a long answer
(an object whose ``story`` string has at least ``--output-len`` * 8 characters), so every
constrained request runs to ``--output-len`` tokens like the unconstrained ones (EOS ignored):
both sides decode the same batch for the same number of steps and the ratio is the cost of the
grammar (bitmask fill on the host, mask applied to the logits, matchers advanced).
Runs alternate (plain, constrained, plain, ...) in one process; the best of ``--repeats`` each counts.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_structured.py [--num-requests 32] [--output-len 128]
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string", "minLength": 4096}},
          "required": ["title", "story"], "additionalProperties": False}


def run(llm, prompts: list[str], params) -> tuple[float, int]:  # noqa: ANN001 - LLM and SamplingParams
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    llm = LLM(device="cpu", max_model_len=1024)
    prompts = [f"Write story number {i} as a JSON object with a title and the story:" for i in range(args.num_requests)]
    plain = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.output_len,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    t0 = time.perf_counter()  # warm-up; the first grammar also loads xgrammar and builds the tokenizer info
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, structured_outputs=constrained
                                             .structured_outputs), use_tqdm=False)
    first_grammar_s = time.perf_counter() - t0
    results: dict[str, list[float]] = {"plain": [], "json_schema": []}
    for _ in range(args.repeats):
        for name, params in (("plain", plain), ("json_schema", constrained)):
            seconds, tokens = run(llm, prompts, params)
            assert tokens == args.num_requests * args.output_len, f"{name}: {tokens} tokens"
            results[name].append(tokens / seconds)
            print(f"{name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
    best = {name: max(values) for name, values in results.items()}
    report = {"num_requests": args.num_requests, "output_len": args.output_len,
              "first_grammar_s (import + tokenizer info + compile + 4 steps)": round(first_grammar_s, 2),
              "plain_tok_s": [round(v, 1) for v in results["plain"]],
              "json_schema_tok_s": [round(v, 1) for v in results["json_schema"]],
              "ratio_best": round(best["json_schema"] / best["plain"], 3), "target": 0.85}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

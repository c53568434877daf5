"""In-process (uni) vs multiprocess (mp) executor, TP=1, in the same run: output tok/s.

    PYTHONPATH=. python3 benchmarks/bench_executor.py --model benchmarks/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16

The mp executor ships each step's SchedulerOutput to a worker process and the
sampled tokens back over a pipe; this measures what that costs end to end.
"""

from __future__ import annotations

import argparse
import gc
import random
import time

from pagedllm import LLM, SamplingParams


def _run(backend: str, args: argparse.Namespace, prompts: list[dict]) -> float:
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, skip_tokenizer_init=True,
              max_model_len=args.input_len + args.output_len, gpu_memory_utilization=args.gpu_memory_utilization,
              distributed_executor_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm, outputs
    gc.collect()  # the mp executor's worker process exits here, freeing its GPU memory
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="benchmarks/configs/llama-3-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    results = {backend: _run(backend, args, prompts) for backend in ("uni", "mp")}
    print(f"{'executor':<10}{'output tok/s':>14}{'vs uni':>9}")
    for backend, tok_s in results.items():
        print(f"{backend:<10}{tok_s:>14.1f}{tok_s / results['uni']:>9.3f}")


if __name__ == "__main__":
    main()

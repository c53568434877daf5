"""One process against tensor- and pipeline-parallel worlds, in the same run: output tok/s offline.

    PYTHONPATH=. python3 benchmarks/bench_parallel.py                      # CPU, the default model, fp32
    PYTHONPATH=. python3 benchmarks/bench_parallel.py --configs uni mp-tp1 # one GPU: in-process vs mp, TP=1
    PYTHONPATH=. python3 benchmarks/bench_parallel.py --model benchmarks/configs/llama-3-8b \\
        --load-format dummy --dtype bfloat16 --configs uni tp2 pp2

Each config is `uni` (one worker in this process), `mp-tp1` (one worker in a child process), `tpN`,
`ppN`, `ppN-sync` (pipeline stages one batch at a time: --no-async-scheduling) or `tpNppM`.
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import time

from pagedllm import LLM, SamplingParams


def _engine_kwargs(config: str) -> dict:
    if config == "uni":
        return {}
    if config == "mp-tp1":
        return {"distributed_executor_backend": "mp"}
    match = re.fullmatch(r"(?:tp(\d+))?(?:pp(\d+))?(-sync)?", config)
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"unknown config {config!r}")
    kwargs = {"tensor_parallel_size": int(match.group(1) or 1), "pipeline_parallel_size": int(match.group(2) or 1),
              "distributed_executor_backend": "mp"}
    if match.group(3):
        kwargs["async_scheduling"] = False
    return kwargs


def _run(config: str, args: argparse.Namespace, prompts: list[dict]) -> float:
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              skip_tokenizer_init=True, max_model_len=args.input_len + args.output_len,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
              **_engine_kwargs(config))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up at full size (a tiny one left the first timed run with one-off costs on the H200: 0.68x).
    llm.generate(prompts[:args.max_num_seqs], params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm, outputs
    gc.collect()  # the workers exit here, freeing their memory
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", nargs="+", default=["uni", "pp2-sync", "pp2", "tp3"])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    results = {config: _run(config, args, prompts) for config in args.configs}
    first = args.configs[0]
    print(f"{'config':<12}{'output tok/s':>14}{f'vs {first}':>10}")
    for config, tok_s in results.items():
        print(f"{config:<12}{tok_s:>14.1f}{tok_s / results[first]:>10.3f}")


if __name__ == "__main__":
    main()

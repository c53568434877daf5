"""Host overhead of one decode step at large batch: Scheduler.schedule + update_from_output, pure Python.

The model is replaced by a fake that samples a fixed token, so this measures only the scheduler and KV
cache manager (the part of a GPU step during which the GPU waits).

    .venv/bin/python benchmarks/bench_scheduler.py [--num-requests 256]
"""

from __future__ import annotations

import argparse
import random
import time

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput
from pagedllm.core.request import Request
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    rng = random.Random(0)
    sched = Scheduler(SchedulerConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=8192,
                                      max_model_len=2048),
                      CacheConfig(block_size=16), num_blocks=60000)
    for i in range(args.num_requests):
        prompt = [rng.randrange(32000) for _ in range(rng.randint(100, 1024))]
        sched.add_request(Request(str(i), prompt, SamplingParams(max_tokens=args.output_len, ignore_eos=True), 2))
    t_sched = t_update = 0.0
    steps = decode_steps = 0
    while sched.has_unfinished_requests():
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        ids = list(out.num_scheduled_tokens)
        runner = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[7] for _ in ids])
        sched.update_from_output(out, runner)
        t2 = time.perf_counter()
        for rid in list(sched.requests):
            if sched.requests[rid].is_finished():
                sched.free_finished(rid)
        if all(n == 1 for n in out.num_scheduled_tokens.values()):
            t_sched += t1 - t0
            t_update += t2 - t1
            decode_steps += 1
        steps += 1
    print(f"{args.num_requests} requests, {steps} steps ({decode_steps} decode-only)")
    print(f"decode step: schedule {1e3 * t_sched / decode_steps:.3f} ms, "
          f"update_from_output {1e3 * t_update / decode_steps:.3f} ms")


if __name__ == "__main__":
    main()

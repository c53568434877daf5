"""On one GPU: the mp executor (worker in a child process, TP=1) gives the in-process tokens."""

from __future__ import annotations

import gc
import random

import pytest

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_mp_executor_matches_in_process_on_gpu() -> None:
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(rng.randint(4, 200))]}
               for _ in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    tokens = {}
    for backend in ("uni", "mp"):
        llm = LLM("benchmarks/configs/llama-3-8b", load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=512, gpu_memory_utilization=0.4, distributed_executor_backend=backend, seed=0)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        gc.collect()
    assert tokens["mp"] == tokens["uni"]

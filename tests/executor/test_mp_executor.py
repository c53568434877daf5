"""The multiprocess executor (``--distributed-executor-backend mp``): the worker in a child
process gives the same greedy tokens as the in-process one, and a dead worker is a clear error."""

from __future__ import annotations

import gc
import os
import random
import signal

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.executor.backends import resolve_backend
from tests.tiny_llama import save_tiny_llama

# fp32 and a small KV cache: 12 requests do not fit at once, so some are preempted (recomputed).
ENGINE = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              num_gpu_blocks_override=16, block_size=16, max_num_seqs=12, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Llama (the executor's plumbing does not depend on the model's size)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _prompts() -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(rng.randint(3, 40))]} for _ in range(12)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_backend_is_chosen_like_vllm() -> None:
    assert resolve_backend(None, 1) == "uni"
    assert resolve_backend(None, 2) == "mp"
    assert resolve_backend("mp", 1) == "mp"
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineArgs(distributed_executor_backend="threads")
    assert resolve_backend(None, 4, local_gpus=8) == "mp"
    assert resolve_backend(None, 16, local_gpus=8) == "ray"  # more GPUs than this host has
    assert resolve_backend(None, 2, local_gpus=0) == "mp"  # the CPU


def test_mp_matches_in_process_then_a_killed_worker_is_a_clear_error(model_dir: str) -> None:
    prompts, params = _prompts(), SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    uni = LLM(model_dir, **ENGINE)
    expected = [o.outputs[0].token_ids for o in uni.generate(prompts, params)]
    assert uni.engine.scheduler.num_preemptions > 0, "the small cache should force preemption"
    del uni
    gc.collect()

    mp = LLM(model_dir, **ENGINE, distributed_executor_backend="mp")
    executor = mp.engine.executor
    (pid,) = executor.worker_pids()
    assert pid != os.getpid()
    got = [o.outputs[0].token_ids for o in mp.generate(prompts, params)]
    assert got == expected
    assert mp.engine.scheduler.num_preemptions > 0

    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker rank 0 died \(exit code -9\)"):
        mp.generate(prompts[:1], params)
    executor.shutdown()
    assert not _alive(pid)


def test_worker_stops_when_the_llm_is_garbage_collected(model_dir: str) -> None:
    mp = LLM(model_dir, **ENGINE, distributed_executor_backend="mp")
    (pid,) = mp.engine.executor.worker_pids()
    assert _alive(pid)
    del mp
    gc.collect()
    assert not _alive(pid)

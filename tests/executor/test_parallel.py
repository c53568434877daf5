"""Tensor and pipeline parallelism over real processes (gloo on the CPU, fp32): TP=2, PP=2 and
TP=2 x PP=2 through the mp executor, and TP=2 x PP=2 through Ray actors on a local Ray cluster,
give greedy tokens identical to one process on a mixed batch with preemption; the default model
(tied embeddings, GGUF) splits into pipeline stages and into three tensor-parallel ranks; a killed
worker is a clear error and leaves no process behind."""

from __future__ import annotations

import gc
import os
import random
import signal
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.executor.backends import resolve_backend
from pagedllm.executor.errors import ExecutorDeadError
from tests.executor.test_mp_executor import _alive
from tests.tiny_llama import save_tiny_llama, tiny_llama

# fp32 and a small KV cache: 12 requests do not fit at once, so some are preempted (recomputed).
ENGINE = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              num_gpu_blocks_override=16, block_size=16, max_num_seqs=12, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """Four layers (two per pipeline stage), 4 query / 2 KV heads (two per tensor-parallel rank)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[list[int]]:
    llm = LLM(model_dir, **ENGINE)
    tokens = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0, "the small cache should force preemption"
    del llm
    gc.collect()
    return tokens


def _prompts() -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(rng.randint(3, 40))]} for _ in range(12)]


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY)]


@pytest.mark.parametrize(("tp", "pp", "async_scheduling"),
                         [(1, 1, True), (2, 1, None), (2, 1, True), (1, 2, None), (2, 2, None)])
def test_mp_world_matches_one_process(model_dir: str, expected: list[list[int]], tp: int, pp: int,
                                      async_scheduling: bool | None) -> None:
    """Async scheduling is off by default on the CPU without stages (on with them); forced on (as on a GPU),
    the engine launches step N+1 before it reads step N, and the workers answer for N once N+1 is queued."""
    llm = LLM(model_dir, **ENGINE, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              async_scheduling=async_scheduling, distributed_executor_backend="mp")
    executor = llm.engine.executor
    assert len(executor.worker_pids()) == tp * pp and executor.driver_rank == (pp - 1) * tp
    in_flight, launch = [], executor._launch_step

    def counting_launch(scheduler_output, on_device):
        step = launch(scheduler_output, on_device)
        in_flight.append(executor._num_launched - executor._num_finished)
        return step

    executor._launch_step = counting_launch
    assert _generate(llm) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    # Pipeline stages work on different batches at once (one per stage, and the next one queued);
    # without stages (on the CPU, no async scheduling) one step at a time.
    assert max(in_flight) == (pp + 1 if pp > 1 else 2 if async_scheduling else 1)
    pids = executor.worker_pids()
    executor.shutdown()
    assert not any(_alive(pid) for pid in pids)


def test_a_killed_rank_is_named_and_takes_the_world_down(model_dir: str) -> None:
    llm = LLM(model_dir, **ENGINE, tensor_parallel_size=2)
    pids = llm.engine.executor.worker_pids()
    os.kill(pids[1], signal.SIGKILL)  # rank 0 then fails in its all-reduce: the report names rank 1
    start = time.monotonic()
    with pytest.raises(ExecutorDeadError, match=r"worker rank 1 died \(exit code -9\)"):
        llm.generate(_prompts()[:2], GREEDY)
    assert time.monotonic() - start < 30
    del llm
    gc.collect()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def test_ray_world_matches_one_process(model_dir: str, expected: list[list[int]]) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert resolve_backend(None, 4) == "ray"  # a connected Ray cluster is used, as vLLM does
        llm = LLM(model_dir, **ENGINE, tensor_parallel_size=2, pipeline_parallel_size=2)
        executor = llm.engine.executor
        assert type(executor).__name__ == "RayExecutor"
        assert _generate(llm) == expected
        ray.kill(executor.actors[3])
        with pytest.raises(ExecutorDeadError, match="worker rank 3 died"):
            llm.generate(_prompts()[:2], GREEDY)
        executor.shutdown()
        deadline = time.monotonic() + 30  # Ray frees resources asynchronously
        while ray.available_resources().get("CPU") != 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU") == 4  # the actors and placement group are given back
    finally:
        ray.shutdown()


def test_default_model_in_pipeline_stages_and_tensor_parallel_ranks() -> None:
    """SmolLM2 (30 layers, 9 heads, 3 KV heads, tied embeddings) from its GGUF file: PP=2 (the last stage
    loads the tied head from the embedding) and TP=3 give the tokens of one process."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    one = LLM(dtype="float32", device="cpu")
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    del one
    gc.collect()
    for tp, pp in [(1, 2), (3, 1)]:
        llm = LLM(dtype="float32", device="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected, (tp, pp)
        llm.engine.executor.shutdown()
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\) is not divisible"):
        LLM(dtype="float32", device="cpu", tensor_parallel_size=2)


def test_parallel_config_errors_name_the_field() -> None:
    from transformers import GPT2Config

    from pagedllm.models.registry import check_parallel_shapes

    check_parallel_shapes(GPT2Config(), 1, 1)  # one rank: nothing to split, the architecture is checked later
    with pytest.raises(ValueError, match="architecture GPT2LMHeadModel is not supported"):
        check_parallel_shapes(GPT2Config(architectures=["GPT2LMHeadModel"]), 2, 1)
    with pytest.raises(ValueError, match="distributed_executor_backend='uni'"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="draft model"):
        EngineArgs(tensor_parallel_size=2, speculative_config={"model": "x", "num_speculative_tokens": 2})
    assert EngineArgs(pipeline_parallel_size=2, device="cpu").resolved_async_scheduling()  # batches in flight
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineArgs(pipeline_parallel_size=0)


@pytest.mark.parametrize(("method", "bits", "group", "v1", "desc_act"), [
    ("gptq", 4, 32, True, False), ("gptq", 8, 16, False, False), ("gptq", 4, 16, True, True),
    ("awq", 4, 32, False, False)])
def test_gptq_and_awq_checkpoints_split_over_two_ranks(tmp_path, method: str, bits: int, group: int, v1: bool,
                                                       desc_act: bool) -> None:
    """Each rank cuts the packed tensors in their own layouts (outputs: columns, packed in AWQ's qweight and
    every qzeros; inputs: GPTQ's packed rows, AWQ's rows, and the groups of the rank's inputs, or every group
    for an act-order checkpoint)."""
    from tests.quantization import gptq_reference as ref

    ref.write_checkpoint(tiny_llama(), tmp_path, method, bits, group=group, sym=v1, v1=v1, desc_act=desc_act)
    one = LLM(str(tmp_path), **ENGINE)
    expected = [o.outputs[0].token_ids for o in one.generate(_prompts()[:6], GREEDY)]
    del one
    gc.collect()
    two = LLM(str(tmp_path), **ENGINE, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in two.generate(_prompts()[:6], GREEDY)] == expected
    two.engine.executor.shutdown()


def test_ngram_speculation_through_tensor_and_pipeline_ranks(model_dir: str) -> None:
    """Drafts reach every rank with the step; the last stage verifies; earlier stages take the accepted tokens."""
    rng = random.Random(1)
    prompts = []
    for _ in range(8):  # repetitive prompts: the n-gram proposer finds drafts
        base = [rng.randrange(3, 256) for _ in range(6)]
        prompts.append({"prompt_token_ids": (base * 4)[: rng.randint(12, 24)]})
    one = LLM(model_dir, **ENGINE)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    del one
    gc.collect()
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    for tp, pp in [(2, 1), (1, 2)]:
        llm = LLM(model_dir, **ENGINE, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=spec)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
        assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
        llm.engine.executor.shutdown()


def test_a_request_id_reused_while_its_step_is_in_the_pipeline(model_dir: str) -> None:
    """The old request's token, sampled by a step still in the pipeline, must not reach the new request's
    row on the first stage (the scheduler drops it; so does the stage, by the step that sampled it)."""
    old_prompt, new_prompt = _prompts()[0]["prompt_token_ids"], _prompts()[1]["prompt_token_ids"]
    one = LLM(model_dir, **ENGINE)
    expected = one.generate([{"prompt_token_ids": new_prompt}], GREEDY)[0].outputs[0].token_ids
    del one
    gc.collect()
    llm = LLM(model_dir, **ENGINE, pipeline_parallel_size=2)
    eng = llm.engine
    # Other requests keep steps launching between the two finishes that carry an "x" token.
    for i, other in enumerate(_prompts()[2:6]):
        eng.add_request(f"other{i}", other["prompt_token_ids"], GREEDY)
    eng.add_request("x", old_prompt, GREEDY)
    for _ in range(40):
        eng.step()
        if eng.scheduler.requests["x"].num_output_tokens >= 3 and any(
                "x" in sched.num_scheduled_tokens for sched, _ in eng._in_flight):
            break
    else:
        pytest.fail("x never had a step in flight")
    eng.abort_request(["x"])
    eng.add_request("x", new_prompt, GREEDY)
    tokens = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == "x" and out.finished:
                tokens = out.outputs[0].token_ids
    assert tokens == expected
    llm.engine.executor.shutdown()

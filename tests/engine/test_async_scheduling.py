"""Async scheduling (engine/llm_engine.py, core/scheduler.py, worker/async_output.py) on the CPU.

Forced on with ``async_scheduling=True`` (on the CPU nothing runs while the host schedules, but
every piece runs: placeholders, tokens fed to the next step from the device tensor, outputs one
step late). Oracle: the same engine in synchronous mode, token for token (fp32): under KV-cache
pressure with both preemption modes, chunked prefill, prefix hits, n > 1 and seeded sampling,
logprobs, stop strings and stop ids, and requests whose sampling reads the host's tokens
(penalties, min_tokens) mixed in. Every block is back in the pool afterwards.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from tests.engine.runner_agreement import assert_runner_agrees
from tests.tiny_llama import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_async"))


def _tiny(path: str, async_scheduling: bool, **kwargs) -> LLM:
    kwargs.setdefault("device", "cpu")
    return LLM(path, dtype="float32", skip_tokenizer_init=True, block_size=16, max_model_len=256,
               async_scheduling=async_scheduling, **kwargs)


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [1] + [rng.randrange(3, 256) for _ in range(40)]
    return [(shared if i % 3 == 0 else [1]) + [rng.randrange(3, 256) for _ in range(rng.randint(2, 60))]
            for i in range(n)]


def _assert_pool_empty(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks
    assert not kv.req_to_blocks and not llm.engine.scheduler.requests
    assert not llm.engine._in_flight and not llm.engine.scheduler._owed_to_finished


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[tuple]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        result.append([(tuple(c.token_ids), c.finish_reason, c.stop_reason,
                        None if c.logprobs is None else [sorted((k, round(v.logprob, 4)) for k, v in d.items())
                                                          for d in c.logprobs])
                       for c in o.outputs])
    return result


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_greedy_identical_to_sync_under_pressure(tiny_dir: str, preemption_mode: str) -> None:
    prompts = _prompts(0, 20)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 70), ignore_eos=True) for _ in prompts]
    kwargs = dict(num_gpu_blocks_override=24, max_num_batched_tokens=64, preemption_mode=preemption_mode,
                  swap_space=0.01)
    want = _run(_tiny(tiny_dir, False, **kwargs), prompts, params)
    llm = _tiny(tiny_dir, True, **kwargs)
    assert llm.engine.async_scheduling
    got = _run(llm, prompts, params)
    assert got == want
    assert llm.engine.scheduler.num_preemptions > 0  # the run did exercise preemption beside a step in flight
    _assert_pool_empty(llm)


def test_sampling_logprobs_forks_and_host_token_requests_identical_to_sync(tiny_dir: str) -> None:
    prompts = _prompts(2, 12)
    params = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=i, max_tokens=30, logprobs=2))
        elif kind == 1:
            params.append(SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[7, 9, 11, 13]))
        elif kind == 2:  # reads its previous tokens on the host: the engine steps synchronously meanwhile
            params.append(SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, min_tokens=5))
        else:
            params.append(SamplingParams(temperature=1.0, top_k=20, seed=100 + i, max_tokens=40, ignore_eos=True))
    kwargs = dict(num_gpu_blocks_override=40, max_num_batched_tokens=96)
    want = _run(_tiny(tiny_dir, False, **kwargs), prompts, params)
    llm = _tiny(tiny_dir, True, **kwargs)
    got = _run(llm, prompts, params)
    assert got == want
    _assert_pool_empty(llm)
    # Plain requests alone run ahead again: no step waits for the host's tokens.
    assert not llm.engine.scheduler.needs_sync_step


def test_a_finished_request_costs_at_most_one_extra_step(tiny_dir: str) -> None:
    prompts = _prompts(3, 8)
    params = [SamplingParams(temperature=0, max_tokens=50, stop_token_ids=list(range(3, 40))) for _ in prompts]
    counts = {}
    for mode in (False, True):
        llm = _tiny(tiny_dir, mode)
        seen = []
        sched = llm.engine.scheduler
        schedule = sched.schedule

        def counting_schedule(schedule=schedule, seen=seen):
            out = schedule()
            seen.append(out.total_num_scheduled_tokens)
            return out
        sched.schedule = counting_schedule
        outs = _run(llm, prompts, params)
        counts[mode] = (sum(seen), outs)
    assert counts[True][1] == counts[False][1]
    # Each request that stopped on a token had at most one more position computed for nothing.
    assert counts[False][0] <= counts[True][0] <= counts[False][0] + len(prompts)


def test_stop_strings_and_text_identical_on_the_default_model() -> None:
    prompts = ["The capital of France is", "List three colors:", "def fib(n):", "Once upon a time"]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[".", "\n\n"]),
              SamplingParams(temperature=0, max_tokens=24, stop=["3."], include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=24, logprobs=1),
              SamplingParams(temperature=0.7, seed=5, max_tokens=24, ignore_eos=True)]
    results = {}
    for mode in (False, True):
        llm = LLM(dtype="float32", max_model_len=256, async_scheduling=mode)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[mode] = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    assert results[True] == results[False]
    assert any(r[2] == "stop" for r in results[True])


def test_config_resolution() -> None:
    assert EngineArgs(device="cpu").resolved_async_scheduling() is False  # auto: off on the CPU
    assert EngineArgs(device="cpu", async_scheduling=True).resolved_async_scheduling() is True
    # auto: on wherever CUDA runs the steps (device "auto" picks CUDA when there is one)
    for device in ("auto", "cuda"):
        assert EngineArgs(device=device).resolved_async_scheduling() is torch.cuda.is_available()
    assert EngineArgs(device="cuda", async_scheduling=False).resolved_async_scheduling() is False
    ngram = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}
    assert EngineArgs(device="cuda", speculative_config=ngram).resolved_async_scheduling() is False
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(async_scheduling=True, speculative_config=ngram).resolved_async_scheduling()
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--no-async-scheduling"])).async_scheduling is False
    assert EngineArgs.from_cli_args(parser.parse_args(["--async-scheduling"])).async_scheduling is True
    assert EngineArgs.from_cli_args(parser.parse_args([])).async_scheduling is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_async_identical_to_sync_with_cuda_graphs(tiny_dir: str, enforce_eager: bool) -> None:
    """On the GPU the next step really is prepared while this one runs, and decode steps replay CUDA
    graphs whose input ids the previous step's sampled tensor fills on the device. The batches are the
    same in both modes here (all admitted at once, all end by length), so the tokens are too: GPU
    matmuls are not batch-invariant, so runs whose batches differ may differ in near-ties."""
    prompts = _prompts(4, 24)
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=48, ignore_eos=True, logprobs=1)
              for i in range(len(prompts))]
    kwargs = dict(device="cuda", enforce_eager=enforce_eager)
    want = _run(_tiny(tiny_dir, False, **kwargs), prompts, params)
    llm = _tiny(tiny_dir, True, **kwargs)
    got = _run(llm, prompts, params)
    assert [g[0][0] for g in got] == [w[0][0] for w in want]
    _assert_pool_empty(llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_async_under_pressure_keeps_lengths_and_agrees(tiny_dir: str) -> None:
    prompts = _prompts(6, 24)
    rng = random.Random(7)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 80), ignore_eos=True) for _ in prompts]
    kwargs = dict(device="cuda", num_gpu_blocks_override=40, max_num_batched_tokens=128)
    want = _run(_tiny(tiny_dir, False, **kwargs), prompts, params)
    llm = _tiny(tiny_dir, True, **kwargs)
    got = _run(llm, prompts, params)
    assert [len(g[0][0]) for g in got] == [p.max_tokens for p in params]
    same = sum(g[0][0] == w[0][0] for g, w in zip(got, want))
    assert same >= 0.8 * len(prompts), (same, got, want)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_pool_empty(llm)


def _drain(eng: LLMEngine, limit: int = 2000) -> dict[str, list[list[int]]]:
    """Step until the engine is idle; the final token ids of each finished request by id."""
    done = {}
    for _ in range(limit):
        if not eng.has_unfinished_requests():
            return done
        for out in eng.step():
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
        assert_runner_agrees(eng)
    raise AssertionError(f"not finished after {limit} steps")


def _alone(tiny_dir: str, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    eng = _tiny(tiny_dir, False).engine
    eng.add_request("x", prompt, params.clone())
    return _drain(eng)["x"]


def test_ids_reused_across_runs_match_a_fresh_engine(tiny_dir: str) -> None:
    """Fuzzer bug: at the end of a run the last schedule() scheduled nothing (the token in flight
    ends the request by length), the engine dropped that output and with it the ids finished
    the step before; the runner kept their rows, and an n > 1 run that reused the ids livelocked."""
    llm = _tiny(tiny_dir, True, num_gpu_blocks_override=60)
    prompts = _prompts(8, 4)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(n=3, temperature=0, max_tokens=10 + 7 * i, ignore_eos=True)
        llm.engine.add_request("x", prompt, params.clone())
        assert _drain(llm.engine)["x"] == _alone(tiny_dir, prompt, params)


@pytest.mark.parametrize("how", ["abort", "stop", "abort_then_sync"])
def test_an_id_reused_while_its_step_is_in_flight_gets_none_of_its_tokens(tiny_dir: str, how: str) -> None:
    """A request ends (abort, or a stop token) while the step after it is in flight and its id comes
    back at once: that step's token, reserved slot and fed input id belong to the old request."""
    rng = random.Random(9)
    first = [1] + [rng.randrange(3, 256) for _ in range(11)]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    stop_at = _alone(tiny_dir, first, greedy)[0][5]
    llm = _tiny(tiny_dir, True)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at]) if how == "stop" else greedy
    eng.add_request("x", first, params)
    old = eng.scheduler.requests["x"]
    for _ in range(20):
        finished = any(out.finished for out in eng.step())
        if finished or (how != "stop" and old.num_output_tokens >= 5):
            break
    assert len(eng._in_flight) == 1 and "x" in eng._in_flight[0][0].num_scheduled_tokens
    # The step in flight samples x's token at position num_tokens + placeholders - 1: make that the new
    # prompt's last position, whose input id decides the new request's first token.
    second = [1] + [rng.randrange(3, 256) for _ in range(old.num_tokens + old.num_output_placeholders - 1)]
    if how != "stop":
        eng.abort_request("x")
    # A request that reads its tokens on the host makes the next step() finish the one in flight
    # before the runner hears of the abort.
    again = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.2) if how == "abort_then_sync" \
        else SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eng.add_request("x", second, again.clone())
    assert _drain(eng)["x"] == _alone(tiny_dir, second, again)
    _assert_pool_empty(llm)

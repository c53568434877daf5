"""Review regressions on the real default model: bad input must fail alone, as a ValueError naming
the field, and never take down other requests or leave work behind in the engine."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu", max_model_len=128, num_gpu_blocks_override=32, block_size=16)


def _drain(llm: LLM) -> dict:
    finished = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_out_of_range_seed_is_rejected_and_does_not_break_other_requests(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("bystander", "The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    engine.step()
    try:
        engine.add_request("big-seed", "Hi", SamplingParams(seed=2**64, max_tokens=2))
    except ValueError as e:  # rejecting it up front is fine, as long as the field is named
        assert "seed" in str(e)
    try:
        finished = _drain(llm)  # must not raise
    finally:
        engine.abort_request(["bystander", "big-seed"])  # leave the shared engine clean either way
    assert finished["bystander"].outputs[0].finish_reason == "length"
    assert len(finished["bystander"].outputs[0].token_ids) == 4


def test_negative_and_large_valid_seeds_reproduce(llm: LLM) -> None:
    for seed in (-5, 2**62):
        params = SamplingParams(seed=seed, max_tokens=6, temperature=1.0)
        a = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
        b = llm.generate(["Once upon a time", "Other prompt"], params, use_tqdm=False)[0].outputs[0].token_ids
        assert a == b


def test_generate_with_an_invalid_prompt_leaves_nothing_queued(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["a valid prompt", [10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.scheduler.requests


def test_n_samples_each_cut_at_their_own_stop_string(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=24, stop=[","], ignore_eos=True)
    out = llm.generate("Count slowly: 1, 2, 3, 4,", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert "," not in c.text
        if c.finish_reason == "stop":
            assert c.stop_reason == ","
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 24
    kv = llm.engine.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks


def test_prompt_filling_the_context_gets_exactly_one_token(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("word " * 200)[:127]
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_tokens|context length"):
        llm.generate([ids + [ids[0]]], SamplingParams(max_tokens=1), use_tqdm=False)

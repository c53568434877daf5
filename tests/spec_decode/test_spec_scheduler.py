"""Scheduler and KV cache with speculative decoding, over a fake runner that verifies drafts (no torch).

Oracle: the fake model is deterministic, so every request's output must equal what
the same scheduler produces without speculation, whatever the drafts, the cache
pressure (preemption by recompute or swap), prefix hits or budget; and after every
run no block, CPU block or bookkeeping entry is left (Driver.finish).
"""

from __future__ import annotations

import random

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.scheduler import Scheduler
from pagedllm.spec_decode import SpeculativeConfig
from tests.core.fake_runner import BS, Driver, expected_chain, make_request
from tests.spec_decode.spec_fake import SpecDriver


def _scheduler(k: int, num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8, max_model_len: int = 128,
               num_cpu_blocks: int = 0, caching: bool = True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                        preemption_mode="swap" if num_cpu_blocks else "recompute",
                        speculative_config=SpeculativeConfig(k) if k else None),
        CacheConfig(block_size=BS, enable_prefix_caching=caching), num_blocks=num_blocks,
        num_cpu_blocks=num_cpu_blocks)


def _requests(seed: int, n: int) -> list[tuple[str, list[int], dict]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 900) for _ in range(9)]
    reqs = []
    for i in range(n):
        prompt = ([*shared] if i % 3 == 0 else []) + [rng.randrange(1, 900) for _ in range(rng.randint(1, 14))]
        params = dict(max_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.5)
        reqs.append((f"r{i}", prompt, params))
    return reqs


def _run(driver: Driver, reqs: list[tuple[str, list[int], dict]], eos: int | None = None) -> dict[str, list[int]]:
    for req_id, prompt, params in reqs:
        driver.scheduler.add_request(make_request(req_id, prompt, eos=eos, **params))
    return driver.run()


@pytest.mark.parametrize("seed", range(6))
def test_outputs_identical_with_and_without_drafts_under_pressure(seed: int) -> None:
    rng = random.Random(seed)
    cfg = dict(num_blocks=rng.choice([13, 20, 64]), budget=rng.choice([8, 16, 64]),
               num_cpu_blocks=rng.choice([0, 0, 16]), caching=rng.random() < 0.7)
    reqs = _requests(seed, 12)
    eos = rng.choice([None, 500])
    plain = _run(Driver(_scheduler(0, **cfg)), reqs, eos)
    spec_driver = SpecDriver(_scheduler(4, **cfg), k=4, p_wrong=rng.choice([0.0, 0.3, 0.9]), seed=seed)
    assert _run(spec_driver, reqs, eos) == plain
    stats = spec_driver.scheduler.spec_stats
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens <= stats.num_draft_tokens


def test_pressure_run_preempts_and_hits_the_prefix_cache() -> None:
    """The pressured configuration above really preempts and really hits (so the oracle covers both)."""
    sched = _scheduler(4, num_blocks=14, budget=16)
    driver = SpecDriver(sched, k=4, p_wrong=0.3)
    _run(driver, _requests(1, 12))
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.stats.hits > 0
    assert any(so.scheduled_spec_decode_tokens for so in driver.steps)


def test_stop_token_inside_an_accepted_run_ends_the_output_there() -> None:
    prompt = [10, 11, 12]
    chain = expected_chain(prompt, 20)
    eos = chain[5]  # the 6th token: inside the first accepted run of 4 drafts + 1
    driver = SpecDriver(_scheduler(4), k=4, p_wrong=0.0)
    out = _run(driver, [("a", prompt, dict(max_tokens=20))], eos=eos)
    assert out["a"] == chain[:6]
    update = [u for ups in driver.updates for u in ups if u.finished][0]
    assert update.finish_reason == "stop" and update.new_token_ids[-1] == eos


def test_stop_token_id_and_max_tokens_inside_a_run() -> None:
    prompt = [40, 41]
    chain = expected_chain(prompt, 30)
    driver = SpecDriver(_scheduler(6), k=6, p_wrong=0.0)
    out = _run(driver, [("stop", prompt, dict(max_tokens=30, stop_token_ids=[chain[9]])),
                        ("len", prompt, dict(max_tokens=11))])
    assert out["stop"] == chain[:10]
    assert out["len"] == chain[:11]
    assert driver.scheduler.requests == {}


def test_rejected_lookahead_blocks_are_given_back_and_computed_tokens_roll_back() -> None:
    sched = _scheduler(8)
    driver = SpecDriver(sched, k=8, p_wrong=1.0)  # every first draft wrong: nothing accepted
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=40))
    kv = sched.kv_cache_manager
    for _ in range(6):
        so = driver.step()
        req = sched.requests["a"]
        if so.scheduled_spec_decode_tokens:
            assert so.num_scheduled_tokens["a"] == 9  # last token + 8 lookahead slots
            assert req.num_computed_tokens == req.num_tokens - 1  # 8 rejected positions rolled back
        assert len(kv.get_block_ids("a")) == -(-req.num_tokens // BS)
    stats = sched.spec_stats
    assert stats.num_accepted_tokens == 0 and stats.num_draft_tokens == 8 * stats.num_drafts
    driver.run()


def test_drafts_are_cut_to_the_budget() -> None:
    sched = _scheduler(8, budget=6)
    driver = SpecDriver(sched, k=8, p_wrong=0.0)
    out = _run(driver, [("a", [5, 6], dict(max_tokens=25)), ("b", [7], dict(max_tokens=25))])
    assert out == {"a": expected_chain([5, 6], 25), "b": expected_chain([7], 25)}
    assert max(so.total_num_scheduled_tokens for so in driver.steps) == 6
    assert sched.spec_stats.num_accepted_tokens_per_pos[0] >= sched.spec_stats.num_accepted_tokens_per_pos[-1]


def test_prefix_hashes_cover_accepted_tokens_only() -> None:
    """A request finished after rejections leaves cached blocks whose hashes match a request
    replaying its accepted tokens: the hit is correct (the fake runner reads every position back)."""
    sched = _scheduler(4, num_blocks=32)
    driver = SpecDriver(sched, k=4, p_wrong=0.5)
    prompt = [3, 9, 27, 81, 243]
    out = _run(driver, [("a", prompt, dict(max_tokens=24))])
    hits = sched.kv_cache_manager.stats.hits
    again = _run(driver, [("b", prompt + out["a"], dict(max_tokens=3))])
    assert sched.kv_cache_manager.stats.hits - hits >= (len(prompt) + 24 - 1) // BS * BS
    assert again["b"] == expected_chain(prompt + out["a"], 3)

"""Scheduler: token budget, chunked prefill, FCFS / priority, preemption, stop conditions, abort, admission.

Every scenario runs through tests/core/fake_runner.Driver, which checks after each step that the
budget and max_num_seqs hold, block ref counts match the block tables, the runner's view of each
request (tokens, block table) matches the scheduler's, and, at the end, that every block is back in
the pool and no request is left.
"""

import random

import pytest

from pagedllm.core.request import RequestStatus
from pagedllm.core.scheduler import Scheduler
from tests.core.fake_runner import BS, Driver, expected_chain, make_request, make_scheduler


def step_until_preemption(drv: Driver, max_steps: int = 100) -> None:
    for _ in range(max_steps):
        drv.step()
        if drv.scheduler.num_preemptions:
            return
    raise AssertionError("no preemption happened")


def run_all(sched: Scheduler, specs) -> dict[str, list[int]]:
    for spec in specs:
        sched.add_request(make_request(*spec[:2], **spec[2]))
    return Driver(sched).run()


# ---- token budget, chunked prefill, ordering --------------------------------------------

def test_long_prompt_is_chunked_and_samples_only_at_its_end():
    sched = make_scheduler(budget=8)
    a = make_request("a", list(range(100, 120)), max_tokens=3)
    sched.add_request(a)
    sched.add_request(make_request("b", [1, 2, 3], max_tokens=3))
    sched.add_request(make_request("c", list(range(30, 40)), max_tokens=3))
    drv = Driver(sched)

    assert drv.step().num_scheduled_tokens == {"a": 8}
    assert a.num_computed_tokens == 8 and a.output_token_ids == [] and drv.updates[-1] == []
    assert drv.step().num_scheduled_tokens == {"a": 8}
    assert a.num_computed_tokens == 16 and a.output_token_ids == [] and drv.updates[-1] == []
    # The chunk that reaches the prompt's end samples; what is left of the budget goes to b, then c.
    assert drv.step().num_scheduled_tokens == {"a": 4, "b": 3, "c": 1}
    assert a.output_token_ids == [120] and sched.requests["c"].output_token_ids == []
    assert drv.step().num_scheduled_tokens == {"a": 1, "b": 1, "c": 6}
    outputs = drv.run()
    assert outputs == {"a": [120, 121, 122], "b": [4, 5, 6], "c": [40, 41, 42]}


def test_budget_respected_every_step_with_many_requests():
    sched = make_scheduler(budget=7, max_num_seqs=16, num_blocks=128)
    rng = random.Random(1)
    specs = [(f"r{i}", [rng.randrange(900) for _ in range(rng.randint(1, 30))], {"max_tokens": rng.randint(1, 9)})
             for i in range(12)]
    outputs = run_all(sched, specs)  # the driver asserts the budget each step
    assert outputs == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_running_requests_are_scheduled_before_waiting_ones():
    sched = make_scheduler(budget=4)
    sched.add_request(make_request("a", [1, 2], max_tokens=8))
    drv = Driver(sched)
    drv.step()
    sched.add_request(make_request("b", list(range(50, 62)), max_tokens=2))
    for _ in range(4):  # b's 12-token prompt takes 3 + 3 + 3 + 3 around a's decodes
        so = drv.step()
        assert list(so.num_scheduled_tokens.items()) == [("a", 1), ("b", 3)]
    assert drv.run() == {"a": expected_chain([2], 8), "b": expected_chain([61], 2)}


def test_max_num_seqs_and_fcfs_admission_order():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    specs = [(f"r{i}", [10 * i + 1, 10 * i + 2], {"max_tokens": m}) for i, m in enumerate([5, 2, 4, 1, 3])]
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    first_step: dict[str, int] = {}
    step = 0
    while sched.has_unfinished_requests():
        so = drv.step()
        assert len(so.num_scheduled_tokens) <= 2
        for rid in so.num_scheduled_tokens:
            first_step.setdefault(rid, step)
        step += 1
    order = sorted(first_step, key=lambda r: (first_step[r], int(r[1:])))
    assert order == [s[0] for s in specs]
    # A waiting request is admitted the step after a slot frees, not before.
    # r1 ends at step 1 (2 tokens), r0 at step 4, r2 at step 5, r3 at step 5.
    assert first_step == {"r0": 0, "r1": 0, "r2": 2, "r3": 5, "r4": 6}
    assert drv.finish() == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_fcfs_one_prompt_per_step_under_a_tight_budget():
    sched = make_scheduler(budget=6)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", [i] * 5, max_tokens=2))
    drv = Driver(sched)
    admitted = []
    while sched.has_unfinished_requests():
        admitted += [r.req_id for r in drv.step().scheduled_new_reqs]
    assert admitted == ["r0", "r1", "r2", "r3"]
    drv.finish()


def test_prefix_hit_through_the_scheduler():
    sched = make_scheduler()
    prompt = list(range(200, 210))
    drv = Driver(sched)
    sched.add_request(make_request("a", prompt, max_tokens=2))
    assert drv.run() == {"a": [210, 211]}
    b = make_request("b", prompt + [7], max_tokens=2)
    sched.add_request(b)
    so = drv.step()
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and so.num_scheduled_tokens == {"b": 3}
    assert b.num_cached_tokens == 8
    # Two identical prompts admitted in one step: the second hits blocks the first fills this step.
    sched.add_request(make_request("c", prompt, max_tokens=2))
    sched.add_request(make_request("d", [9] * 9, max_tokens=2))
    sched.add_request(make_request("e", [9] * 9, max_tokens=2))
    so = drv.step()
    assert so.num_scheduled_tokens["c"] == 2 and so.num_scheduled_tokens["e"] == 1
    outputs = drv.run()
    assert outputs == {"b": [8, 9], "c": [210, 211], "d": [10, 11], "e": [10, 11]}


# ---- preemption ------------------------------------------------------------------------

def _pressure_specs():
    return [(f"r{i}", [i + 1] * 6, {"max_tokens": 10}) for i in range(4)]  # 4 blocks each at the end


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_newest_first_resumes_and_matches_unpressured_run(caching):
    specs = _pressure_specs()
    reference = run_all(make_scheduler(num_blocks=64, caching=caching), specs)
    sched = make_scheduler(num_blocks=8, caching=caching)
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    preempted_ever, resumed = set(), set()
    while sched.has_unfinished_requests():
        running_before = [r.request_id for r in sched.running]
        so = drv.step()
        if so.preempted_req_ids:
            k = len(so.preempted_req_ids)
            assert so.preempted_req_ids == set(running_before[-k:])  # the newest go first
            assert [r.request_id for r in sched.waiting][:k] == running_before[-k:]  # to the front, in order
            assert not so.scheduled_new_reqs  # nothing admitted in a step that had to preempt
            preempted_ever |= so.preempted_req_ids
        for c in so.scheduled_cached_reqs:
            if c.resumed_from_preemption:
                assert c.req_id in preempted_ever
                assert c.new_block_ids == sched.kv_cache_manager.get_block_ids(c.req_id)
                assert len(c.new_block_ids) == -(-(c.num_computed_tokens + so.num_scheduled_tokens[c.req_id]) // BS)
                resumed.add(c.req_id)
    assert sched.num_preemptions > 0 and preempted_ever and resumed == preempted_ever
    assert drv.finish() == reference
    assert reference == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_preempted_request_waits_at_the_front_of_other_waiting_requests():
    sched = make_scheduler(num_blocks=6, max_num_seqs=2)  # r0 and r1 cannot both grow to 4 blocks
    specs = _pressure_specs() + [("late", [77] * 3, {"max_tokens": 2})]
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    step_until_preemption(drv)
    victim = sched.waiting.peek()
    assert victim.request_id == "r1" and victim.status == RequestStatus.PREEMPTED
    assert victim.num_computed_tokens == 0 and victim.output_token_ids
    assert [r.request_id for r in sched.waiting][1:] == ["r2", "r3", "late"]
    assert drv.run() == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_swap_preemption_keeps_progress_on_the_cpu_and_resumes_from_it():
    specs = _pressure_specs()
    sched = make_scheduler(num_blocks=8, num_cpu_blocks=16)
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    step_until_preemption(drv)
    victim = sched.waiting.peek()
    assert victim.status == RequestStatus.SWAPPED and victim.num_computed_tokens > 0
    cpu_blocks = sched.cpu_block_pool.req_to_blocks
    assert len(cpu_blocks[victim.request_id]) == -(-victim.num_computed_tokens // BS)
    assert len(drv.steps[-1].blocks_to_swap_out) == sum(map(len, cpu_blocks.values()))  # every victim swapped
    victim_cpu_ids = {b.block_id for b in cpu_blocks[victim.request_id]}
    while victim.status != RequestStatus.RUNNING:
        so = drv.step()  # the fake runner reads every resumed position back from the swapped-in blocks
    assert {cpu for cpu, _ in so.blocks_to_swap_in} >= victim_cpu_ids
    assert victim.request_id not in sched.cpu_block_pool
    assert drv.run() == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_swap_falls_back_to_recompute_without_room_on_the_cpu():
    sched = make_scheduler(num_blocks=8, num_cpu_blocks=1)  # too small for any victim's KV
    specs = _pressure_specs()
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    step_until_preemption(drv)
    victim = sched.waiting.peek()
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert not drv.steps[-1].blocks_to_swap_out
    assert drv.run() == {rid: expected_chain(p, kw["max_tokens"]) for rid, p, kw in specs}


def test_abort_of_a_swapped_request_frees_its_cpu_blocks():
    sched = make_scheduler(num_blocks=8, num_cpu_blocks=16)
    for rid, prompt, kw in _pressure_specs():
        sched.add_request(make_request(rid, prompt, **kw))
    drv = Driver(sched)
    step_until_preemption(drv)
    victim = sched.waiting.peek()
    assert victim.status == RequestStatus.SWAPPED
    cpu = sched.cpu_block_pool
    num_free = cpu.get_num_free_blocks() + len(cpu.req_to_blocks[victim.request_id])
    sched.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
    assert victim not in sched.waiting and victim.request_id not in cpu and cpu.get_num_free_blocks() == num_free
    drv.run()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_workload_with_swap_matches_unpressured_run(policy, seed):
    rng = random.Random(seed)
    specs = [(f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 12))], {"max_tokens": rng.randint(1, 12)})
             for i in range(16)]
    reference = run_all(make_scheduler(num_blocks=256, budget=256, policy=policy), specs)
    # Little swap space: some victims swap, others recompute.
    sched = make_scheduler(num_blocks=10, budget=9, max_num_seqs=5, policy=policy, num_cpu_blocks=6)
    drv = Driver(sched)
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, priority=rng.randint(0, 2), **kw))
    assert drv.run() == reference
    assert any(so.blocks_to_swap_in for so in drv.steps) and sched.num_preemptions > 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_under_pressure_matches_unpressured_run(policy, caching, seed):
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(8)]
    specs = []
    for i in range(16):
        prompt = (shared[: rng.choice([0, 4, 8])] + [rng.randrange(1000) for _ in range(rng.randint(1, 12))])
        specs.append((f"r{i}", prompt, {"max_tokens": rng.randint(1, 12)}))
    reference = run_all(make_scheduler(num_blocks=256, budget=256, policy=policy, caching=caching), specs)
    sched = make_scheduler(num_blocks=10, budget=9, max_num_seqs=5, policy=policy, caching=caching)
    drv = Driver(sched)
    pending = list(specs)
    while pending or sched.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):  # requests keep arriving
            if pending:
                rid, prompt, kw = pending.pop(0)
                sched.add_request(make_request(rid, prompt, priority=rng.randint(0, 2), **kw))
        if sched.has_unfinished_requests():
            drv.step()
    assert sched.num_preemptions > 0
    assert drv.finish() == reference


# ---- priority policy ------------------------------------------------------------------

def test_priority_lower_value_runs_first_then_arrival():
    sched = make_scheduler(max_num_seqs=1, policy="priority")
    for rid, prio, t in [("low", 5, 0.0), ("high", 0, 1.0), ("mid", 2, 2.0), ("high2", 0, 3.0)]:
        sched.add_request(make_request(rid, [1, 2], priority=prio, arrival=t, max_tokens=2))
    drv = Driver(sched)
    admitted = []
    while sched.has_unfinished_requests():
        admitted += [r.req_id for r in drv.step().scheduled_new_reqs]
    assert admitted == ["high", "high2", "mid", "low"]
    drv.finish()


def test_priority_preempts_the_lowest_priority_running_request():
    # Running order [h1, low, h2]: FCFS would preempt h2 (the newest); priority must pick low.
    sched = make_scheduler(num_blocks=3, policy="priority")
    specs = {"h1": ([1, 2, 3], 0, 0.0), "low": ([5, 6], 5, 1.0), "h2": ([8, 9], 0, 2.0)}
    reqs = {rid: make_request(rid, p, priority=prio, arrival=t, max_tokens=4) for rid, (p, prio, t) in specs.items()}
    drv = Driver(sched)
    sched.add_request(reqs["h1"])
    sched.add_request(reqs["low"])
    drv.step()
    sched.add_request(reqs["h2"])
    drv.step()
    assert [r.request_id for r in sched.running] == ["h1", "low", "h2"]
    so = drv.step()  # h1 needs a second block and none is free
    assert so.preempted_req_ids == {"low"}
    assert set(so.num_scheduled_tokens) == {"h1", "h2"}
    assert sched.waiting.peek() is reqs["low"] and reqs["low"].num_preemptions == 1
    assert drv.run() == {rid: expected_chain(p, 4) for rid, (p, _, _) in specs.items()}


def test_priority_preempting_an_already_scheduled_request_unschedules_it():
    """BUG (scheduler.py, _allocate_or_preempt / schedule running loop): under the priority policy the
    victim can be a running request already scheduled earlier in this step. It stays in
    num_scheduled_tokens (and scheduled_cached_reqs) while its blocks are handed to the request that
    preempted it, so the runner writes both requests' K/V into the same block."""
    sched = make_scheduler(num_blocks=3, policy="priority")
    low = make_request("low", [1, 2, 3], priority=5, arrival=0.0, max_tokens=8)
    high = make_request("high", [11, 12, 13], priority=0, arrival=1.0, max_tokens=8)
    drv = Driver(sched)
    sched.add_request(low)
    drv.step()
    sched.add_request(high)
    drv.step()
    drv.step()  # low takes the last free block for position 4
    assert [r.request_id for r in sched.running] == ["low", "high"]
    so = drv.step()  # low is scheduled first, then high needs a block: low must give way
    assert so.preempted_req_ids == {"low"}
    assert so.num_scheduled_tokens == {"high": 1}
    assert drv.run() == {"low": expected_chain([1, 2, 3], 8), "high": expected_chain([11, 12, 13], 8)}


# ---- stop conditions -------------------------------------------------------------------

STOP_CASES = {
    # id: (eos, sampling params, expected output, finish reason, stop_reason); prompts end in 10
    "eos": (13, {"max_tokens": 10}, [11, 12, 13], "stop", None),
    "ignore_eos": (13, {"max_tokens": 6, "ignore_eos": True}, [11, 12, 13, 14, 15, 16], "length", None),
    "eos_before_min_tokens": (12, {"max_tokens": 6, "min_tokens": 3}, [11, 12, 13, 14, 15, 16], "length", None),
    "eos_at_min_tokens": (12, {"max_tokens": 6, "min_tokens": 2}, [11, 12], "stop", None),
    "stop_token": (None, {"max_tokens": 10, "stop_token_ids": [14, 99]}, [11, 12, 13, 14], "stop", 14),
    "stop_token_before_min": (None, {"max_tokens": 4, "stop_token_ids": [11], "min_tokens": 2},
                              [11, 12, 13, 14], "length", None),
    "max_tokens": (None, {"max_tokens": 4}, [11, 12, 13, 14], "length", None),
    "max_tokens_none": (None, {"max_tokens": None}, list(range(11, 11 + 20 - 2)), "length", None),
    "eos_is_first": (11, {"max_tokens": 5}, [11], "stop", None),
}


def test_stop_conditions():
    sched = make_scheduler(max_model_len=20, budget=16)
    reqs = {}
    for rid, (eos, params, *_rest) in STOP_CASES.items():
        reqs[rid] = make_request(rid, [3, 10], eos=eos, **params)
        sched.add_request(reqs[rid])
    drv = Driver(sched)
    outputs = drv.run()
    for rid, (_, _, expected, reason, stop_reason) in STOP_CASES.items():
        req = reqs[rid]
        assert outputs[rid] == expected, rid
        assert req.get_finished_reason() == reason, rid
        assert req.stop_reason == stop_reason, rid
    # The updates stream each token once and say "finished" exactly once, on the last one.
    streamed = {rid: [] for rid in reqs}
    finished = {rid: 0 for rid in reqs}
    for ups in drv.updates:
        for up in ups:
            assert finished[up.req_id] == 0
            streamed[up.req_id] += up.new_token_ids
            finished[up.req_id] += up.finished
    assert streamed == outputs and all(n == 1 for n in finished.values())


def test_max_model_len_caps_a_request_at_the_context_length():
    sched = make_scheduler(max_model_len=12)
    capped = make_request("capped", [1] * 5, max_tokens=None)
    sched.add_request(capped)
    assert capped.max_tokens == 7
    sched.add_request(make_request("exact", [2] * 4, max_tokens=8))  # 4 + 8 == 12 is allowed
    outputs = Driver(sched).run()
    assert outputs == {"capped": expected_chain([1], 7), "exact": expected_chain([2], 8)}
    assert capped.get_finished_reason() == "length" and capped.num_tokens == 12


# ---- abort ---------------------------------------------------------------------------------

def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=16, max_num_seqs=2)
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, [5] * 9, max_tokens=6))
    drv = Driver(sched)
    drv.step()
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    num_a_blocks = len(sched.kv_cache_manager.get_block_ids("a"))
    assert num_a_blocks == 3
    done = sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in done] == ["a"]
    # a's blocks are shared with b (same prompt), so only a's own last block comes back.
    assert pool.get_num_free_blocks() == free_before + 1
    assert sched.requests["a"].get_finished_reason() == "abort"
    assert sched.finish_requests(["c", "a", "nope"], RequestStatus.FINISHED_ABORTED)[0].request_id == "c"
    so = drv.step()
    assert so.finished_req_ids == {"a", "c"} and set(so.num_scheduled_tokens) == {"b"}
    assert "a" not in drv.runner.reqs
    assert drv.run()["b"] == expected_chain([5], 6)


def test_abort_of_an_unshared_running_request_returns_all_its_blocks():
    sched = make_scheduler(num_blocks=16)
    sched.add_request(make_request("a", list(range(9)), max_tokens=6))
    sched.add_request(make_request("b", list(range(50, 59)), max_tokens=6))
    drv = Driver(sched)
    drv.step()
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert pool.get_num_free_blocks() == free_before + 3
    drv.run()


def test_abort_while_the_step_runs_drops_its_output():
    sched = make_scheduler()
    a = make_request("a", [1, 2, 3], max_tokens=5)
    sched.add_request(a)
    drv = Driver(sched)
    drv.step()
    so = sched.schedule()
    ro = drv.runner.execute(so)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(so, ro) == []
    assert a.output_token_ids == [4] and a.status == RequestStatus.FINISHED_ABORTED
    assert sched.schedule().finished_req_ids == {"a"}
    drv.finish()


def test_abort_of_waiting_and_preempted_requests():
    sched = make_scheduler(num_blocks=8)
    specs = _pressure_specs()
    for rid, prompt, kw in specs:
        sched.add_request(make_request(rid, prompt, **kw))
    sched.add_request(make_request("never", [9], max_tokens=1))
    drv = Driver(sched)
    step_until_preemption(drv)
    victim = sched.waiting.peek()
    assert victim.status == RequestStatus.PREEMPTED
    done = sched.finish_requests([victim.request_id, "never"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in done} == {victim.request_id, "never"}
    assert victim not in sched.waiting and sched.requests["never"].status == RequestStatus.FINISHED_ABORTED
    outputs = drv.run()
    for rid, prompt, kw in specs:
        if rid != victim.request_id:
            assert outputs[rid] == expected_chain(prompt, kw["max_tokens"])


# ---- admission -----------------------------------------------------------------------------

def test_add_request_rejects_what_could_never_be_served():
    sched = make_scheduler(num_blocks=4, max_model_len=32)  # the cache holds 16 tokens
    with pytest.raises(ValueError, match="max_tokens"):
        sched.add_request(make_request("too_long", [1] * 20, max_tokens=13))
    with pytest.raises(ValueError, match="block"):
        sched.add_request(make_request("too_big", [1] * 10, max_tokens=7))  # 17 tokens > 16
    with pytest.raises(ValueError, match="prompt"):
        sched.add_request(make_request("empty", [], max_tokens=1))
    with pytest.raises(ValueError):
        sched.add_request(make_request("whole_ctx", [1] * 32, max_tokens=None))
    assert not sched.requests and not sched.waiting
    sched.add_request(make_request("fits", [1] * 10, max_tokens=6))  # exactly 16 tokens
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("fits", [2], max_tokens=1))
    assert len(sched.waiting) == 1
    assert Driver(sched).run() == {"fits": expected_chain([1], 6)}


def test_add_request_rejects_a_duplicate_id_while_running():
    sched = make_scheduler()
    sched.add_request(make_request("x", [1, 2], max_tokens=3))
    drv = Driver(sched)
    drv.step()
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("x", [1, 2], max_tokens=3))
    assert drv.run() == {"x": [3, 4, 5]}


def test_prefix_cache_stats_count_queries_and_hits():
    sched = make_scheduler()
    stats = sched.kv_cache_manager.stats
    drv = Driver(sched)
    expected = [("a", list(range(10)), (10, 0)),  # cold
                ("b", list(range(9)), (19, 8)),  # a's two full blocks hit
                ("c", [42] * 5, (24, 8)),  # miss
                ("lp", list(range(10)), (24, 8))]  # prompt_logprobs skips the cache: not counted
    for rid, prompt, want in expected:
        sched.add_request(make_request(rid, prompt, max_tokens=2, prompt_logprobs=1 if rid == "lp" else None))
        drv.run()
        assert (stats.queries, stats.hits) == want, rid


def test_prefix_cache_stats_count_each_prompt_once():
    """A request that waits for blocks is looked up again every step, and a preempted one is
    looked up again when it resumes; each prompt still counts once."""
    sched = make_scheduler(num_blocks=4)
    sched.add_request(make_request("a", [1] * 8, max_tokens=8))  # holds 2 blocks, grows to 4
    sched.add_request(make_request("b", [2] * 12, max_tokens=4))  # needs 3 blocks: waits for a
    drv = Driver(sched)
    drv.run()
    assert drv.steps[1].scheduled_new_reqs == []  # b really waited
    stats = sched.kv_cache_manager.stats
    assert (stats.queries, stats.hits) == (8 + 12, 0)

    sched = make_scheduler(num_blocks=8)
    specs = _pressure_specs()
    run_all(sched, specs)
    assert sched.num_preemptions > 0
    stats = sched.kv_cache_manager.stats
    assert stats.queries == sum(len(p) for _, p, _ in specs)


def test_prefix_caching_off_records_no_stats_and_shares_nothing():
    sched = make_scheduler(caching=False)
    prompt = list(range(10))
    sched.add_request(make_request("a", prompt, max_tokens=3))
    sched.add_request(make_request("b", prompt, max_tokens=3))
    drv = Driver(sched)
    assert drv.run() == {"a": expected_chain(prompt, 3), "b": expected_chain(prompt, 3)}
    assert [n.num_computed_tokens for n in drv.steps[0].scheduled_new_reqs] == [0, 0]
    assert drv.steps[0].num_scheduled_tokens == {"a": 10, "b": 10}
    stats = sched.kv_cache_manager.stats
    assert (stats.queries, stats.hits) == (0, 0) and not sched.kv_cache_manager.block_pool.cached_blocks


def test_prompt_logprobs_of_each_chunk_reach_the_engine_and_stats_report_kv_usage():
    """A chunk that samples nothing still carries its prompt logprobs out in an update."""
    from pagedllm.core.outputs import LogprobsLists, ModelRunnerOutput

    sched = make_scheduler(budget=8, num_blocks=16)
    sched.add_request(make_request("a", list(range(100, 112)), max_tokens=2, prompt_logprobs=1))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    chunk_lp = LogprobsLists([[101 + i, 7] for i in range(8)], [[-1.0, -0.5]] * 8, [2] * 8)
    updates = sched.update_from_output(out, ModelRunnerOutput(["a"], [[]], prompt_logprobs={"a": chunk_lp}))
    assert [(u.req_id, u.new_token_ids, u.new_prompt_logprobs) for u in updates] == [("a", [], chunk_lp)]
    stats = sched.stats()
    used = stats.num_total_blocks - stats.num_free_blocks
    assert used >= 2 and stats.kv_cache_usage == used / stats.num_total_blocks

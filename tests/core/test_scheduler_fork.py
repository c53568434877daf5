"""Scheduler forks: n > 1 samples share their prompt's KV (add_request(fork_from=...)), and
fork_request starts a request from a running one's KV (beam search). Full blocks are shared by
ref count; a partly filled last block is copied on write (SchedulerOutput.blocks_to_copy).

The fake runner makes the copies and reads every position back through each block table, so a
missing or wrong copy, or a shared block written by two requests, fails the run.
"""

import random

import pytest

from pagedllm.core.request import RequestStatus
from tests.core.fake_runner import BS, Driver, expected_chain, make_request, make_scheduler


def _add_samples(sched, prompt, n, **params):
    reqs = [make_request(f"{i}_r", prompt, **params) for i in range(n)]
    for i, req in enumerate(reqs):
        sched.add_request(req, fork_from=reqs[0].request_id if i else None)
    return reqs


@pytest.mark.parametrize("caching", [True, False])
def test_samples_share_full_prompt_blocks_and_copy_the_partial_one(caching):
    sched = make_scheduler(caching=caching)
    prompt = [1, 2, 3, 4, 5, 6]  # the samples fork at 5 tokens: block 0 full, block 1 partial
    src, c1, c2 = _add_samples(sched, prompt, 3, max_tokens=4)
    kv = sched.kv_cache_manager
    drv = Driver(sched)
    so = drv.step()
    assert set(so.num_scheduled_tokens) == {src.request_id}  # the prompt is computed once
    src_blocks = kv.get_block_ids(src.request_id)
    for child in (c1, c2):
        assert child.num_computed_tokens == len(prompt) - 1 and child.status == RequestStatus.FORKED
        blocks = kv.get_block_ids(child.request_id)
        assert blocks[0] == src_blocks[0] and blocks[1] != src_blocks[1]
    assert kv.block_pool.blocks[src_blocks[0]].ref_cnt == 3
    so = drv.step()
    assert sorted(so.blocks_to_copy) == sorted((src_blocks[1], kv.get_block_ids(c.request_id)[1]) for c in (c1, c2))
    assert so.num_scheduled_tokens == {src.request_id: 1, c1.request_id: 1, c2.request_id: 1}
    assert {n.req_id: n.num_computed_tokens for n in so.scheduled_new_reqs} == {c1.request_id: 5, c2.request_id: 5}
    assert drv.run() == {r.request_id: expected_chain(prompt, 4) for r in (src, c1, c2)}


def test_fork_at_a_block_boundary_copies_nothing():
    sched = make_scheduler()
    prompt = [7] * (BS + 1)  # fork at BS tokens: one full block, nothing partial
    src, child = _add_samples(sched, prompt, 2, max_tokens=3)
    drv = Driver(sched)
    drv.step()
    kv = sched.kv_cache_manager
    assert kv.get_block_ids(child.request_id) == kv.get_block_ids(src.request_id)[:1]
    assert drv.step().blocks_to_copy == []
    assert drv.run() == {r.request_id: expected_chain(prompt, 3) for r in (src, child)}


def test_samples_wait_for_a_chunked_prompt():
    sched = make_scheduler(budget=4)
    prompt = list(range(20, 30))
    src, child = _add_samples(sched, prompt, 2, max_tokens=2)
    drv = Driver(sched)
    drv.step()
    drv.step()  # 8 of 10 prompt tokens: not yet enough to fork at 9
    assert child in sched.fork_waiters[src.request_id] and child.num_computed_tokens == 0
    assert child.status == RequestStatus.WAITING
    drv.step()
    assert child.num_computed_tokens == 9
    assert drv.run() == {r.request_id: expected_chain(prompt, 2) for r in (src, child)}


def test_source_that_stops_right_after_its_prompt_still_seeds_the_samples():
    sched = make_scheduler()
    prompt = [1, 2, 3, 4, 5, 6]
    src = make_request("src", prompt, max_tokens=1)
    child = make_request("child", prompt, max_tokens=3)
    sched.add_request(src)
    sched.add_request(child, fork_from="src")
    assert Driver(sched).run() == {"src": expected_chain(prompt, 1), "child": expected_chain(prompt, 3)}


def test_fork_from_unknown_or_different_prompt_prefills_normally():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=2))
    sched.add_request(make_request("b", [9, 9, 9], max_tokens=2), fork_from="a")  # not a's prompt
    sched.add_request(make_request("c", [1, 2, 3], max_tokens=2), fork_from="nope")
    assert not sched.fork_waiters and [r.request_id for r in sched.waiting] == ["a", "b", "c"]
    assert Driver(sched).run() == {"a": [4, 5], "b": [10, 11], "c": [4, 5]}


def test_aborting_a_sample_before_it_started():
    """BUG (scheduler.py, _release_fork_waiters / finish_requests): aborting a request that still
    waits in fork_waiters leaves an empty list under its source's id, and _release_fork_waiters
    returns early on an empty list without deleting it, so has_unfinished_requests() stays True
    forever after the source finishes."""
    sched = make_scheduler()
    prompt = [1, 2, 3, 4, 5, 6]
    src, child = _add_samples(sched, prompt, 2, max_tokens=3)
    assert [r.request_id for r in sched.finish_requests(child.request_id, RequestStatus.FINISHED_ABORTED)] == [
        child.request_id]
    assert sched.get_num_unfinished_requests() == 1
    outputs = Driver(sched).run(max_steps=50)
    assert outputs == {src.request_id: expected_chain(prompt, 3), child.request_id: []}


def test_aborting_all_samples_children_first():
    sched = make_scheduler()
    reqs = _add_samples(sched, [1, 2, 3, 4, 5, 6], 3, max_tokens=3)
    sched.finish_requests([r.request_id for r in reversed(reqs)], RequestStatus.FINISHED_ABORTED)
    assert sched.get_num_unfinished_requests() == 0
    assert not sched.has_unfinished_requests()
    Driver(sched).finish()


@pytest.mark.parametrize("caching", [True, False])
def test_forked_samples_under_cache_pressure_finish(caching):
    """BUG (scheduler.py, schedule waiting loop): a forked sample waits in `waiting` holding KV
    blocks. With max_num_seqs=1 the source runs alone, runs out of blocks, preempts itself and goes
    to the front of `waiting`; it then needs the blocks the sample behind it holds, nothing is
    running to free any, and schedule() returns an empty step forever."""
    sched = make_scheduler(num_blocks=3, max_num_seqs=1, caching=caching)
    prompt = [1, 2, 3, 4, 5, 6]
    reqs = _add_samples(sched, prompt, 2, max_tokens=6)  # 12 tokens: the whole cache each
    drv = Driver(sched)
    statuses = set()
    while sched.has_unfinished_requests():
        drv.step()
        statuses.add(reqs[1].status)
    # The sample was forked, then (its source stuck behind its blocks) turned back into a plain prefill.
    assert {RequestStatus.FORKED, RequestStatus.WAITING} <= statuses
    assert drv.finish() == {r.request_id: expected_chain(prompt, 6) for r in reqs}


# ---- fork_request (beam search) -----------------------------------------------------------

def _running_parent(sched, drv, num_steps=2):
    parent = make_request("p", [1, 2, 3, 4, 5, 6], max_tokens=6)
    sched.add_request(parent)
    for _ in range(num_steps):
        drv.step()
    return parent


def test_fork_request_starts_from_the_parents_kv():
    sched = make_scheduler()
    drv = Driver(sched)
    parent = _running_parent(sched, drv)  # 8 tokens, 7 computed
    beam = make_request("beam", parent.all_token_ids[:7] + [500], max_tokens=3)
    assert sched.fork_request("p", beam) is True
    assert beam.status == RequestStatus.FORKED and beam.num_computed_tokens == 7
    kv = sched.kv_cache_manager
    p_blocks, b_blocks = kv.get_block_ids("p"), kv.get_block_ids("beam")
    assert b_blocks[0] == p_blocks[0] and b_blocks[1] != p_blocks[1]  # 7 tokens: 1 full block + 3 copied
    so = drv.step()
    assert so.blocks_to_copy == [(p_blocks[1], b_blocks[1])]
    assert so.num_scheduled_tokens["beam"] == 1
    outputs = drv.run()
    assert outputs == {"p": expected_chain([6], 6), "beam": [501, 502, 503]}


def test_fork_request_rejects_a_child_that_does_not_extend_the_parent():
    sched = make_scheduler()
    drv = Driver(sched)
    _running_parent(sched, drv)
    with pytest.raises(ValueError, match="extend"):
        sched.fork_request("p", make_request("bad", [1, 2, 9, 4, 5, 6, 7, 8], max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        sched.fork_request("p", make_request("p", [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=2))
    assert "bad" not in sched.requests
    drv.run()


def test_fork_request_without_a_free_block_changes_nothing():
    sched = make_scheduler(num_blocks=3)
    drv = Driver(sched)
    parent = _running_parent(sched, drv)
    sched.add_request(make_request("filler", [9] * 4, max_tokens=2))  # takes the last free block
    drv.step()
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == 0 and parent.num_computed_tokens == 8
    refs = [b.ref_cnt for b in pool.blocks]
    # Forking at 7 tokens needs a copy of the partial second block, and no block is free.
    assert sched.fork_request("p", make_request("beam", parent.all_token_ids[:7] + [500], max_tokens=1)) is False
    assert [b.ref_cnt for b in pool.blocks] == refs and "beam" not in sched.requests
    drv.run()


def test_fork_request_child_without_max_tokens_stops_at_max_model_len():
    """BUG (scheduler.py, fork_request): the child skips add_request's admission, so max_tokens=None
    is never resolved to the room left under max_model_len, and _check_stop compares an int with
    None (TypeError) at the child's first sampled token."""
    sched = make_scheduler(max_model_len=12)
    drv = Driver(sched)
    parent = _running_parent(sched, drv)
    beam = make_request("beam", parent.all_token_ids[:7] + [500], max_tokens=None)
    assert sched.fork_request("p", beam)
    outputs = drv.run()
    assert outputs["beam"] == [501, 502, 503, 504] and beam.get_finished_reason() == "length"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_samples_under_pressure_match_unpressured_run(policy, seed):
    rng = random.Random(seed)
    groups = []  # (ids, prompt, max_tokens, priority): the n samples of one prompt
    for i in range(10):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 10))]
        n = rng.choice([1, 2, 3])
        groups.append(([f"{k}_g{i}" for k in range(n)], prompt, rng.randint(1, 8), rng.randint(0, 2)))

    def add(sched, group):
        ids, prompt, max_tokens, prio = group
        for k, rid in enumerate(ids):
            sched.add_request(make_request(rid, prompt, priority=prio, max_tokens=max_tokens),
                              fork_from=ids[0] if k else None)

    expected = {rid: expected_chain(prompt, m) for ids, prompt, m, _ in groups for rid in ids}
    roomy = make_scheduler(num_blocks=256, budget=256, max_num_seqs=64, policy=policy)
    for g in groups:
        add(roomy, g)
    assert Driver(roomy).run() == expected

    sched = make_scheduler(num_blocks=8, budget=7, max_num_seqs=4, policy=policy)
    drv = Driver(sched)
    pending = list(groups)
    for _ in range(500):
        if pending and rng.random() < 0.5:
            add(sched, pending.pop(0))
        if not pending and not sched.has_unfinished_requests():
            break
        drv.step()
    assert sched.num_preemptions > 0
    assert drv.finish() == expected

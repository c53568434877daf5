"""Review regressions for the scheduler's prefix cache under priority preemption (pure Python, fake runner).

With ``policy="priority"`` the preemption victim can be a request that was already
scheduled earlier in the same step. ``allocate_slots`` registers the hashes of the
blocks that step would fill *before* the forward runs; if the request is then
preempted, the forward never writes them, yet they stay in the prefix cache. A
later request with the same prefix adopts such a block and attends over KV that
was never computed (the fake runner checks every position it reads).
"""

from __future__ import annotations

from tests.core.fake_runner import BS, Driver, make_request, make_scheduler


def _cached_blocks_hold_their_tokens(driver: Driver, hashed_tokens: dict) -> list[int]:
    """Block ids whose cached hash promises tokens the runner never wrote there."""
    bad = []
    for block_hash, block in driver.scheduler.kv_cache_manager.block_pool.cached_blocks.items():
        written = driver.runner.kv.get(block.block_id, {})
        if [written.get(i) for i in range(BS)] != hashed_tokens[block_hash]:
            bad.append(block.block_id)
    return bad


def test_priority_preemption_never_caches_uncomputed_blocks(monkeypatch) -> None:
    import pagedllm.core.kv_cache_manager as kvm

    hashed_tokens: dict = {}
    real_hash = kvm.hash_block_tokens

    def recording_hash(parent, tokens):
        h = real_hash(parent, tokens)
        hashed_tokens[h] = list(tokens)
        return h

    monkeypatch.setattr(kvm, "hash_block_tokens", recording_hash)
    # Found by fuzzing: r2 (low priority, admitted first) is scheduled for the decode that fills its
    # first block, then preempted in the same step for r0/r1 (higher priority).
    sched = make_scheduler(num_blocks=5, budget=7, max_model_len=64, policy="priority", max_num_seqs=4)
    driver = Driver(sched)
    plan = {1: ("r2", [200], 1), 2: ("r0", list(range(8)), 0), 3: ("r1", list(range(100, 109)), 0),
            # Arrives while the bad block is cached and reuses it: [200, 201, 202, 203] is r2's first block.
            5: ("w", [200, 201, 202, 203, 7], -1)}
    poisoned = []
    for step in range(60):
        if step in plan:
            rid, prompt, prio = plan[step]
            sched.add_request(make_request(rid, prompt, priority=prio, arrival=float(step), max_tokens=4,
                                           ignore_eos=True, temperature=0))
        if sched.has_unfinished_requests():
            driver.step()  # the fake runner asserts on any position read that was not written
            poisoned += _cached_blocks_hold_their_tokens(driver, hashed_tokens)
    assert not poisoned, f"blocks cached before their KV was computed: {sorted(set(poisoned))}"
    outputs = driver.finish()
    assert outputs["w"] == [8, 9, 10, 11]

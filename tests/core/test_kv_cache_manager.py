"""KVCacheManager: block tables, automatic prefix caching (chained block hashes), all-or-nothing allocation."""

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams

BS = 4


def _req(req_id: str, prompt: list[int], **params) -> Request:
    return Request(req_id, prompt, SamplingParams(**params), eos_token_id=None)


def _admit(kv: KVCacheManager, req: Request) -> int:
    """Schedule a whole prompt the way the scheduler does for a waiting request; return the hit length."""
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    req.num_computed_tokens = req.num_tokens
    return num_hit


def _snapshot(kv: KVCacheManager):
    pool = kv.block_pool
    return (pool.free_block_queue.block_ids(), [b.ref_cnt for b in pool.blocks],
            [b.block_hash for b in pool.blocks], dict(pool.cached_blocks),
            {k: [b.block_id for b in v] for k, v in kv.req_to_blocks.items()})


def test_block_table_covers_tokens_in_order():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = _req("r", list(range(10)))
    assert _admit(kv, r) == 0
    assert kv.get_block_ids("r") == [0, 1, 2]  # ceil(10 / 4)
    # Decodes fill the last block, then take one more block at position 12.
    for tok in (10, 11):
        r.append_output_token_ids([tok])
        assert kv.allocate_slots(r, 1) == []
        r.num_computed_tokens += 1
    r.append_output_token_ids([12])
    new = kv.allocate_slots(r, 1)
    assert [b.block_id for b in new] == [3] and kv.get_block_ids("r") == [0, 1, 2, 3]
    assert kv.get_block_ids("unknown") == []


def test_prefix_hit_shares_full_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))  # blocks [0..3] [4..7] [8, 9]
    _admit(kv, a)
    b = _req("b", list(range(8)) + [50, 51, 52])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8 and [h.block_id for h in hits] == kv.get_block_ids("a")[:2]
    kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert kv.get_block_ids("b")[2] not in kv.get_block_ids("a")
    assert [blk.ref_cnt for blk in hits] == [2, 2]


def test_prefix_miss_and_partial_blocks_never_hit():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    _admit(kv, _req("a", list(range(10))))
    # The same 10 tokens: only the two full blocks hit; the partial third block never does.
    _, num_hit = kv.get_computed_blocks(_req("same", list(range(10))))
    assert num_hit == 8
    # Diverging inside the first block: nothing hits.
    _, num_hit = kv.get_computed_blocks(_req("miss", [0, 1, 2, 99] + list(range(4, 10))))
    assert num_hit == 0
    # Diverging inside the second block: only the first hits.
    _, num_hit = kv.get_computed_blocks(_req("half", [0, 1, 2, 3, 4, 99, 6, 7, 8]))
    assert num_hit == 4


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    _admit(kv, _req("a", list(range(8))))  # two full cached blocks
    twin = _req("twin", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(twin)
    # Hitting both blocks would leave nothing to run, and the last position's logits are needed.
    assert num_hit == 4 and len(hits) == 1
    new = kv.allocate_slots(twin, twin.num_tokens - num_hit, hits)
    assert len(new) == 1 and len(kv.get_block_ids("twin")) == 2
    # One token more than the cached blocks: every full block hits.
    _, num_hit = kv.get_computed_blocks(_req("longer", list(range(9))))
    assert num_hit == 8


def test_chained_hashing_same_block_after_different_prefix_misses():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    _admit(kv, _req("a", [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    # Block 2 has the same tokens as a's block 2, but follows a different block 1.
    hits, num_hit = kv.get_computed_blocks(_req("b", [2, 2, 2, 2, 5, 6, 7, 8, 0]))
    assert num_hit == 0 and hits == []
    # A request whose FIRST block equals a's SECOND block does not hit either.
    _, num_hit = kv.get_computed_blocks(_req("c", [5, 6, 7, 8, 0]))
    assert num_hit == 0


def test_generated_tokens_fill_cacheable_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = _req("a", [1, 2, 3])
    _admit(kv, a)
    for tok in (4, 5, 6):  # decode: block 0 fills with the first sampled token
        a.append_output_token_ids([tok])
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    # A later prompt equal to a's prompt + outputs reuses the block a's decode filled.
    _, num_hit = kv.get_computed_blocks(_req("b", [1, 2, 3, 4, 5, 6]))
    assert num_hit == 4


def test_allocate_returns_none_and_changes_nothing_when_out_of_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = _req("a", list(range(12)))
    _admit(kv, a)  # 3 of 4 blocks
    b = _req("b", [50] * 8)  # needs 2
    before = _snapshot(kv)
    assert kv.allocate_slots(b, 8) is None
    assert _snapshot(kv)[:4] == before[:4] and kv.get_block_ids("b") == []
    # A running request that needs a new block is refused the same way.
    a.append_output_token_ids([12])
    assert kv.allocate_slots(a, 1) is not None  # takes the last block
    a.num_computed_tokens += 1
    for tok in (13, 14, 15, 16):
        a.append_output_token_ids([tok])
        if tok == 16:
            before = _snapshot(kv)
            assert kv.allocate_slots(a, 1) is None
            assert _snapshot(kv) == before
        else:
            assert kv.allocate_slots(a, 1) == []
            a.num_computed_tokens += 1


def test_adopting_cached_free_blocks_counts_against_the_free_pool():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = _req("a", list(range(9)))
    _admit(kv, a)  # blocks: 2 full (cached) + 1 partial
    kv.free(a)
    assert kv.block_pool.get_num_free_blocks() == 4  # the cached blocks count as free

    # 8 cached tokens + 9 new = 17 tokens = 5 blocks: 2 adopted from the free queue + 3 new > 4.
    big = _req("big", list(range(8)) + [70] * 9)
    hits, num_hit = kv.get_computed_blocks(big)
    assert num_hit == 8 and all(h.ref_cnt == 0 for h in hits)
    before = _snapshot(kv)
    assert kv.allocate_slots(big, big.num_tokens - num_hit, hits) is None
    assert _snapshot(kv)[:4] == before[:4]
    assert all(h.ref_cnt == 0 and kv.block_pool.get_cached_block(h.block_hash) is h for h in hits)

    # 8 cached + 8 new = 4 blocks exactly: fits.
    fits = _req("fits", list(range(8)) + [70] * 8)
    hits, num_hit = kv.get_computed_blocks(fits)
    new = kv.allocate_slots(fits, fits.num_tokens - num_hit, hits)
    assert len(new) == 2 and kv.block_pool.get_num_free_blocks() == 0
    assert kv.get_block_ids("fits")[:2] == [h.block_id for h in hits]


def test_free_returns_all_blocks_last_block_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = _req("a", list(range(10)))
    _admit(kv, a)
    b = _req("b", list(range(8)) + [9, 9])
    _admit(kv, b)  # shares a's two full blocks
    assert kv.block_pool.get_num_free_blocks() == 2
    kv.free(a)
    assert kv.block_pool.get_num_free_blocks() == 3  # shared blocks stay with b
    kv.free(b)
    pool = kv.block_pool
    assert pool.get_num_free_blocks() == 6 and all(blk.ref_cnt == 0 for blk in pool.blocks)
    # Tail first: a's partial block 2, then b's partial block 3, then the shared 1 and 0.
    assert pool.free_block_queue.block_ids() == [4, 5, 2, 3, 1, 0]
    assert kv.get_block_ids("a") == [] and kv.get_block_ids("b") == []
    # The freed full blocks still serve hits.
    _, num_hit = kv.get_computed_blocks(_req("c", list(range(9))))
    assert num_hit == 8


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    _admit(kv, _req("a", list(range(10))))
    # Prompt logprobs need every prompt position computed, so no hit is taken.
    lp = _req("lp", list(range(10)), prompt_logprobs=1)
    assert kv.get_computed_blocks(lp) == ([], 0)
    assert _admit(kv, lp) == 0
    assert not set(kv.get_block_ids("lp")) & set(kv.get_block_ids("a"))


def test_prefix_caching_switched_off():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=False)
    a = _req("a", list(range(10)))
    assert _admit(kv, a) == 0
    assert not kv.block_pool.cached_blocks and all(b.block_hash is None for b in kv.block_pool.blocks)
    assert _admit(kv, _req("b", list(range(10)))) == 0
    assert not set(kv.get_block_ids("a")) & set(kv.get_block_ids("b"))
    kv.free(a)
    assert kv.get_computed_blocks(_req("c", list(range(10)))) == ([], 0)


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))
    _admit(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.forget(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(_req("b", list(range(10)))) == ([], 0)
    assert not kv.req_to_blocks.get("a") and "a" not in kv.req_to_block_hashes

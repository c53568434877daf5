"""BlockPool and FreeBlockQueue: O(1) free list, ref counts, LRU eviction of cached free blocks, the hash map.

CpuBlockPool: swap space handed out per request on the same free list."""

import random
import time

import pytest

from pagedllm.core.block_pool import BlockPool, CpuBlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens


def _ids(blocks):
    return [b.block_id for b in blocks]


def _check_links(q: FreeBlockQueue) -> None:
    """Walk the list both ways: forward and backward orders agree and match the count."""
    fwd = q.block_ids()
    back, b = [], q.tail
    while b is not None:
        back.append(b.block_id)
        b = b.prev_free
    assert fwd == back[::-1]
    assert len(fwd) == q.num_free_blocks
    if fwd:
        assert q.head.prev_free is None and q.tail.next_free is None
    else:
        assert q.head is None and q.tail is None


# ---- FreeBlockQueue --------------------------------------------------------------

def test_free_queue_popleft_append_remove_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    _check_links(q)

    assert q.popleft().block_id == 0
    q.remove(blocks[2])  # middle
    assert q.block_ids() == [1, 3, 4]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    q.remove(blocks[4])  # tail
    q.remove(blocks[1])  # head
    assert q.block_ids() == [3] and q.head is q.tail is blocks[3]
    _check_links(q)

    q.append(blocks[0])
    q.append(blocks[2])
    assert q.block_ids() == [3, 0, 2]
    assert [q.popleft().block_id for _ in range(3)] == [3, 0, 2]
    _check_links(q)
    with pytest.raises(RuntimeError):
        q.popleft()
    q.append(blocks[4])  # append to an empty queue
    assert q.block_ids() == [4] and q.head is q.tail is blocks[4]
    _check_links(q)


def test_free_queue_random_ops_match_a_list_model():
    rng = random.Random(0)
    blocks = [KVCacheBlock(i) for i in range(50)]
    q = FreeBlockQueue(blocks)
    model = list(range(50))
    for _ in range(2000):
        op = rng.random()
        if op < 0.3 and model:
            assert q.popleft().block_id == model.pop(0)
        elif op < 0.6 and model:
            bid = rng.choice(model)
            q.remove(blocks[bid])
            model.remove(bid)
        else:
            out = [i for i in range(50) if i not in model]
            if out:
                bid = rng.choice(out)
                q.append(blocks[bid])
                model.append(bid)
        assert q.num_free_blocks == len(model)
    assert q.block_ids() == model
    _check_links(q)


def test_free_queue_remove_is_constant_time():
    # 50k removals from the middle of a 100k-long queue: O(1) takes well under a second,
    # a list-style O(n) remove would take minutes.
    n = 100_000
    blocks = [KVCacheBlock(i) for i in range(n)]
    q = FreeBlockQueue(blocks)
    start = time.perf_counter()
    for i in range(n // 4, 3 * n // 4):
        q.remove(blocks[i])
    for i in range(n // 4, 3 * n // 4):
        q.append(blocks[i])
    assert time.perf_counter() - start < 5.0
    assert q.num_free_blocks == n
    assert q.head is blocks[0] and q.tail is blocks[3 * n // 4 - 1]


# ---- BlockPool: ref counts --------------------------------------------------------

def test_pool_rejects_empty():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_ref_counts_and_free_queue_membership():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert _ids([a, b]) == [0, 1] and a.ref_cnt == b.ref_cnt == 1
    assert pool.get_num_free_blocks() == 2 and pool.get_usage() == 0.5

    pool.touch([a])  # a second holder
    assert a.ref_cnt == 2
    pool.free_blocks([a, b])
    assert a.ref_cnt == 1 and b.ref_cnt == 0
    assert pool.free_block_queue.block_ids() == [2, 3, 1]  # only b came back
    pool.free_blocks([a])
    assert a.ref_cnt == 0 and pool.free_block_queue.block_ids() == [2, 3, 1, 0]
    assert pool.get_num_free_blocks() == 4 and pool.get_usage() == 0.0

    with pytest.raises(RuntimeError):
        pool.get_new_blocks(5)
    assert pool.get_num_free_blocks() == 4  # a refused request takes nothing


# ---- BlockPool: prefix cache --------------------------------------------------------

def _cache_chain(pool: BlockPool, blocks, token_blocks):
    """Cache blocks as one request's consecutive full blocks; return their hashes."""
    hashes, parent = [], None
    for blk, toks in zip(blocks, token_blocks):
        parent = hash_block_tokens(parent, toks)
        pool.cache_block(blk, parent)
        hashes.append(parent)
    return hashes


def test_hash_chains_over_the_whole_prefix():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, (1, 2)) == h1  # any iterable of ids
    assert hash_block_tokens(h1, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
    # Same tokens after a different parent: different identity.
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 2]), [3, 4])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])


def test_lru_eviction_order_of_cached_free_blocks():
    pool = BlockPool(6)
    r1 = pool.get_new_blocks(3)  # blocks 0, 1, 2
    r2 = pool.get_new_blocks(2)  # blocks 3, 4
    h1 = _cache_chain(pool, r1, [[1], [2], [3]])
    h2 = _cache_chain(pool, r2, [[7], [8]])
    # r1 finishes first, then r2; each frees tail first, as the KV cache manager does.
    pool.free_blocks(reversed(r1))
    pool.free_blocks(reversed(r2))
    assert pool.free_block_queue.block_ids() == [5, 2, 1, 0, 4, 3]
    assert all(pool.get_cached_block(h) is not None for h in h1 + h2)

    # The never-used block goes first, then the oldest freed, a request's last block first.
    evict_order = []
    for _ in range(6):
        (blk,) = pool.get_new_blocks(1)
        evict_order.append(blk.block_id)
        assert blk.block_hash is None and blk.ref_cnt == 1
    assert evict_order == [5, 2, 1, 0, 4, 3]
    assert not pool.cached_blocks


def test_reusing_a_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    (h,) = _cache_chain(pool, [blk], [[5, 6]])
    assert pool.get_cached_block(h) is blk and blk.block_hash == h
    pool.free_blocks([blk])
    assert pool.get_cached_block(h) is blk  # freed but still a hit
    pool.get_new_blocks(1)  # takes the never-used block 1 first
    assert pool.get_cached_block(h) is blk
    (again,) = pool.get_new_blocks(1)
    assert again is blk
    assert pool.get_cached_block(h) is None and blk.block_hash is None


def test_touch_of_free_cached_block_unlinks_it():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    hashes = _cache_chain(pool, blocks, [[1], [2], [3]])
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_queue.block_ids() == [3, 2, 1, 0]

    hit = pool.get_cached_block(hashes[1])
    pool.touch([hit])  # a cache hit adopts block 1 out of the middle of the queue
    assert hit.ref_cnt == 1 and pool.get_num_free_blocks() == 3
    assert pool.free_block_queue.block_ids() == [3, 2, 0]
    _check_links(pool.free_block_queue)
    assert pool.get_cached_block(hashes[1]) is hit  # still cached while in use

    # New blocks never hand out the adopted one, and evicting the others leaves it mapped.
    assert 1 not in _ids(pool.get_new_blocks(3))
    assert pool.get_cached_block(hashes[1]) is hit
    assert pool.get_cached_block(hashes[0]) is None and pool.get_cached_block(hashes[2]) is None

    pool.touch([hit])  # touching an in-use block only counts a holder
    assert hit.ref_cnt == 2 and pool.get_num_free_blocks() == 0
    pool.free_blocks([hit, hit])
    assert pool.free_block_queue.block_ids() == [1]


def test_duplicate_hash_first_writer_wins():
    pool = BlockPool(3)
    first, dup = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [4, 4])
    pool.cache_block(first, h)
    pool.cache_block(dup, h)  # same content computed twice (two requests raced)
    assert pool.get_cached_block(h) is first
    assert dup.block_hash == h

    # Evicting the duplicate must not unmap the original.
    pool.free_blocks([dup])
    (reused,) = pool.get_new_blocks(1)  # block 2 (never used) first
    (reused,) = pool.get_new_blocks(1)
    assert reused is dup and dup.block_hash is None
    assert pool.get_cached_block(h) is first

    # Evicting the original does unmap it.
    pool.free_blocks([first])
    (reused,) = pool.get_new_blocks(1)
    assert reused is first and pool.get_cached_block(h) is None


def test_cache_block_keeps_the_first_hash_of_a_block():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    h1, h2 = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    pool.cache_block(blk, h1)
    pool.cache_block(blk, h2)  # already cached: no-op
    assert blk.block_hash == h1
    assert pool.get_cached_block(h1) is blk and pool.get_cached_block(h2) is None


def test_caching_disabled_records_nothing():
    pool = BlockPool(2, enable_caching=False)
    (blk,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_block(blk, h)
    assert blk.block_hash is None and pool.get_cached_block(h) is None and not pool.cached_blocks


def test_reset_prefix_cache():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    hashes = _cache_chain(pool, blocks, [[1], [2]])
    pool.free_blocks(reversed(blocks[1:]))
    assert pool.reset_prefix_cache() is False  # block 0 still in use: nothing forgotten
    assert all(pool.get_cached_block(h) is not None for h in hashes)

    pool.free_blocks(blocks[:1])
    free_order = pool.free_block_queue.block_ids()
    assert pool.reset_prefix_cache() is True
    assert not pool.cached_blocks and all(b.block_hash is None for b in pool.blocks)
    assert pool.free_block_queue.block_ids() == free_order and pool.get_num_free_blocks() == 3


# ---- CpuBlockPool: swap space -------------------------------------------------------

def test_cpu_pool_gives_each_request_its_own_blocks_and_takes_them_back():
    pool = CpuBlockPool(5)
    a = pool.allocate("a", 3)
    b = pool.allocate("b", 2)
    assert len(a) == 3 and len(b) == 2 and not set(a) & set(b)
    assert pool.get_num_free_blocks() == 0 and "a" in pool and "c" not in pool
    assert pool.allocate("c", 1) is None  # full: changes nothing
    assert pool.free("a") == a and "a" not in pool  # ids back in the order they were given
    assert pool.get_num_free_blocks() == 3
    assert pool.free("a") == []  # freeing twice (or a request that never swapped) is a no-op
    c = pool.allocate("c", 3)
    assert sorted(c) == sorted(a)
    pool.free("b")
    pool.free("c")
    assert pool.get_num_free_blocks() == 5 and not pool.req_to_blocks


def test_cpu_pool_refuses_zero_blocks_a_second_allocation_and_an_empty_pool():
    pool = CpuBlockPool(4)
    assert pool.allocate("a", 0) is None
    assert pool.allocate("a", 2) is not None and pool.allocate("a", 1) is None
    assert pool.get_num_free_blocks() == 2
    empty = CpuBlockPool(0)  # no swap space configured
    assert empty.get_num_free_blocks() == 0 and empty.allocate("a", 1) is None and empty.free("a") == []

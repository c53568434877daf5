"""KVCacheManager: each request's block table, and automatic prefix caching on top of the BlockPool.

A request's blocks cover its tokens in order; block i holds positions
[i * block_size, (i + 1) * block_size). Once a block is full its hash (chained with
the previous block's) is recorded, so a later request with the same prefix reuses
the block instead of recomputing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from pagedllm.core.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already in the hash map
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    def usage(self) -> float:
        return self.block_pool.get_usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended as tokens arrive."""
        hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= request.num_tokens:
            start = len(hashes) * bs
            # A request's first block chains to its adapter: two adapters never share KV blocks.
            parent = hashes[-1] if hashes else _lora_seed(request.lora_int_id)
            hashes.append(hash_block_tokens(parent, request.all_token_ids[start:start + bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks: (blocks, number of tokens they cover).

        At least one token is always left to compute, since the last position's
        logits are needed to sample."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVCacheBlock] = []
        for h in hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(h)
            if block is None:
                break
            hit.append(block)
        return hit, len(hit) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (not every retry while it waits for blocks)."""
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix-cache hits to adopt first. Returns the newly
        allocated blocks, or None (changing nothing) if the pool cannot supply them."""
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens
        if not new_computed_blocks:
            # Fast path (most decodes): the last block still has room.
            num_after = num_computed + num_new_tokens
            if num_after <= len(blocks) * self.block_size:
                if num_after % self.block_size == 0 or num_new_tokens > 1:
                    self._cache_full_blocks(request, num_after)
                return []
            new_computed_blocks = []
        num_computed += len(new_computed_blocks) * self.block_size
        num_required = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Cached hits sitting in the free queue stop being free when adopted.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            return None
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash blocks that will be full once `num_tokens` tokens are computed.

        Only tokens already known (prompt and sampled ones) can be hashed."""
        if not self.enable_caching:
            return
        blocks = self.req_to_blocks[request.request_id]
        hashes = self._block_hashes(request)
        num_full = min(num_tokens // self.block_size, len(hashes), len(blocks))
        start = self.num_cached_blocks.get(request.request_id, 0)
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = max(start, num_full)

    def fork(self, parent: Request, child: Request, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `child` the parent's KV for its first `num_tokens` tokens.

        Full blocks are shared by ref count. A partly filled last block is copied on
        write: the child writes its next token into that block, so it gets its own
        copy now. Returns the (src, dst) block copies the runner must make before the
        next forward, or None (changing nothing) when no block is free for the copy.

            parent: [b0 full][b1 full][b2 partial]
            child:  [b0 ----][b1 ----][b7 = copy of b2]      b0, b1 ref_cnt 2
        """
        blocks = self.req_to_blocks.get(parent.request_id, [])
        num_full, partial = divmod(num_tokens, self.block_size)
        if num_full + (1 if partial else 0) > len(blocks):
            raise ValueError(f"fork: parent holds {len(blocks)} blocks, fewer than {num_tokens} tokens need")
        if partial and self.block_pool.get_num_free_blocks() < 1:
            return None
        shared = blocks[:num_full]
        self.block_pool.touch(shared)
        child_blocks = list(shared)
        copies = []
        if partial:
            new = self.block_pool.get_new_blocks(1)[0]
            copies.append((blocks[num_full].block_id, new.block_id))
            child_blocks.append(new)
        self.req_to_blocks[child.request_id] = child_blocks
        self.num_cached_blocks[child.request_id] = num_full if self.enable_caching else 0
        return copies

    def free_lookahead(self, request: Request) -> int | None:
        """Speculative decoding: give back the blocks past the request's known tokens.

        Lookahead slots were allocated for drafts; the blocks that held only rejected
        drafts are freed (never hashed: hashes cover known tokens only). The blocks
        kept cover every known token, the next step's input included. Returns how many
        blocks the request keeps when some were freed, else None."""
        blocks = self.req_to_blocks.get(request.request_id)
        num_needed = -(-request.num_tokens // self.block_size)
        if not blocks or len(blocks) <= num_needed:
            return None
        extra = blocks[num_needed:]
        del blocks[num_needed:]
        self.block_pool.free_blocks(reversed(extra))
        return num_needed

    def uncache_uncomputed(self, request: Request) -> None:
        """Drop the hashes of blocks registered for tokens that were scheduled but never computed.

        allocate_slots hashes the blocks a step will fill; if the request is preempted
        before that step runs, those blocks must not be offered as prefix-cache hits.
        Blocks another request also holds were computed earlier, so they keep their hash."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        for block in blocks[request.num_computed_tokens // self.block_size:]:
            if block.ref_cnt == 1:
                self.block_pool.uncache(block)

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first so it is evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop per-request bookkeeping of a finished request."""
        self.free(request)
        self.req_to_block_hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()


def _lora_seed(lora_int_id: int) -> bytes | None:
    """The parent digest of a request's first block: None for the base model, else one per adapter."""
    return f"lora:{lora_int_id}".encode() if lora_int_id else None

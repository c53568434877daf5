"""BlockPool: the KV cache's physical blocks, their ref counts, and the prefix-cache hash map.

A block whose ref count drops to 0 goes to the tail of the free queue but keeps its
hash: it stays reusable as a prefix-cache hit until it is handed out again. New blocks
are taken from the head, so the least recently freed cached block is evicted first (LRU).

    free queue:  head -> [oldest freed] <-> ... <-> [newest freed] <- tail
                 get_new_blocks() pops here          free_blocks() appends here
    touch(block) on a cache hit unlinks it from the middle in O(1).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

# A full block's identity: a 128-bit BLAKE2b digest of its parent's digest and its own
# token ids. Chaining makes equal digests mean equal whole prefixes; a cryptographic hash
# (not Python's hash()) keeps one tenant from crafting a prompt that collides with another's.
BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: Iterable[int]) -> BlockHash:
    """Chain a block's tokens to its parent: equal hashes mean equal whole prefixes."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        for prev, nxt in zip(blocks, blocks[1:]):
            prev.next_free, nxt.prev_free = nxt, prev
        self.head = blocks[0] if blocks else None
        self.tail = blocks[-1] if blocks else None

    def popleft(self) -> KVCacheBlock:
        if self.head is None:
            raise RuntimeError("no free blocks")  # callers check num_free_blocks first
        block = self.head
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is not None:
            block.prev_free.next_free = block.next_free
        else:
            self.head = block.next_free
        if block.next_free is not None:
            block.next_free.prev_free = block.prev_free
        else:
            self.tail = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        block.prev_free, block.next_free = self.tail, None
        if self.tail is not None:
            self.tail.next_free = block
        else:
            self.head = block
        self.tail = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        out, b = [], self.head
        while b is not None:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of blocks held by running requests (cached free blocks count as free)."""
        return 1.0 - self.get_num_free_blocks() / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take blocks from the head of the free queue, evicting their cached hashes."""
        if num_blocks > self.get_num_free_blocks():
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.get_num_free_blocks()} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (unlinking free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference; blocks reaching 0 join the free queue in the order given
        (callers pass a request's blocks tail first, so its last blocks are evicted first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Record a now-full block under its hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached_blocks.setdefault(block_hash, block)

    def uncache(self, block: KVCacheBlock) -> None:
        """Forget a block's hash (its KV will not be computed after all)."""
        self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only possible when no block is in use."""
        if self.get_num_free_blocks() != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True


class CpuBlockPool:
    """CPU blocks holding swapped-out requests' KV (ids into the runner's CPU cache), per request.

    The free list is a BlockPool's, without prefix caching: a swapped-out block is only
    ever read back by the request that wrote it. An empty pool (no swap space) has no
    BlockPool behind it and never has room.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._pool = BlockPool(num_blocks, enable_caching=False) if num_blocks > 0 else None
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}

    def get_num_free_blocks(self) -> int:
        return self._pool.get_num_free_blocks() if self._pool is not None else 0

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        """Give a request `num_blocks` (>= 1) CPU blocks; None (changing nothing) if too few are free."""
        if not 0 < num_blocks <= self.get_num_free_blocks() or request_id in self.req_to_blocks:
            return None
        blocks = self._pool.get_new_blocks(num_blocks)
        self.req_to_blocks[request_id] = blocks
        return [b.block_id for b in blocks]

    def free(self, request_id: str) -> list[int]:
        """Release a request's CPU blocks (none if it holds none); returns their ids in order."""
        blocks = self.req_to_blocks.pop(request_id, None)
        if not blocks:
            return []
        self._pool.free_blocks(blocks)
        return [b.block_id for b in blocks]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.req_to_blocks

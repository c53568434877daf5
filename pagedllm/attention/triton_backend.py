"""The Triton attention backend ("triton"): paged attention on the GPU.

This module owns the policy: input checks, which kernel path a batch takes,
and the tile sizes. The kernels live in ``triton_paged_attention``; this is
the only module of the package that imports it (and so triton), lazily, via
``get_backend("triton")``.

Paths:
    any batch        -> reshape_and_cache, then one paged-attention launch over
                        all query blocks (prefill chunks and decodes together)
    decode-only      -> same kernel with one program per (sequence, KV head),
                        and, when that is too few programs to fill the GPU, the
                        context split across NUM_SPLITS programs plus a reduce

The decode path is CUDA-graph capturable: it reads only shapes and the
metadata's Python ints (``max_seq_len`` only steers the split count, never a
loop bound, so a graph captured at one length replays correctly at any other),
makes no host syncs, and treats padded rows (seq_lens == 0, slot -1) as empty.
"""

from __future__ import annotations

import os

import torch
import triton

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.attention.triton_paged_attention import paged_attention, reshape_and_cache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tuning constants, measured on an H200 (benchmarks/ATTENTION_NOTES.md): programs per SM the
# split heuristic aims for (4 over-split batch 8 and 64), keys per split below which splitting
# costs more than it adds, the most splits, and pipeline depth of the decode loop (2 beat 3 at
# batch 8 and tied at batch 256).
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
DECODE_NUM_STAGES = 2


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split count (a power of two) for a decode batch: split only when
    (sequence, KV head) programs alone leave SMs idle and contexts are long."""
    programs = num_seqs * num_kv_heads
    target = PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    wanted = min(triton.cdiv(target, programs), max_seq_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    if wanted < 2:
        return 1
    return 1 << (wanted.bit_length() - 1)  # round down to a power of two


def _tile_n(head_dim: int) -> int:
    # Keys per inner-loop step; halved for head_dim 256 to bound registers.
    return 64 if head_dim <= 128 else 32


def _prefill_block_m(max_query_len: int, queries_per_kv: int) -> int:
    """Query rows per program: enough for the longest chunk, 16..64. On the H200 64 rows and
    4 warps ran a causal prefill as fast as 128 rows and 8 warps, and waste less on the
    decode rows of a mixed batch (each decode fills only queries_per_kv rows of its block)."""
    smallest = max(16, triton.next_power_of_2(queries_per_kv))
    return min(max(triton.next_power_of_2(max(1, max_query_len) * queries_per_kv), smallest), max(smallest, 64))


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through the Triton kernels (CUDA, or TRITON_INTERPRET=1 on the CPU).

    ``decode_num_splits`` fixes the decode split count (tests, benchmarks);
    None picks it from the batch and the GPU's SM count.
    """

    name = "triton"

    def __init__(self, decode_num_splits: int | None = None) -> None:
        if decode_num_splits is not None and (decode_num_splits < 1 or decode_num_splits & (decode_num_splits - 1)):
            raise ValueError(f"decode_num_splits must be a power of two >= 1, got {decode_num_splits}")
        self.decode_num_splits = decode_num_splits
        self._checked: set[tuple] = set()
        self._num_sms: dict[torch.device, int] = {}

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        self._check_inputs(query, key, value, kv_cache)
        reshape_and_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        num_heads, head_dim = query.shape[1], query.shape[2]
        queries_per_kv = num_heads // kv_cache.shape[3]
        common = dict(block_tables=metadata.block_tables, seq_lens=metadata.seq_lens,
                      query_start_loc=metadata.query_start_loc, scale=scale, tile_n=_tile_n(head_dim))
        if metadata.is_decode_only:
            num_splits = self.decode_num_splits or choose_num_splits(
                metadata.num_seqs, kv_cache.shape[3], metadata.max_seq_len, self._sm_count(query.device))
            paged_attention(out, query, kv_cache, decode_only=True, num_splits=num_splits,
                            block_m=max(16, triton.next_power_of_2(queries_per_kv)),
                            num_stages=DECODE_NUM_STAGES, **common)
        else:
            block_m = _prefill_block_m(metadata.max_query_len, queries_per_kv)
            paged_attention(out, query, kv_cache, decode_only=False, block_m=block_m,
                            num_warps=8 if block_m >= 128 else 4, **common)
        return out

    def _sm_count(self, device: torch.device) -> int:
        if device not in self._num_sms:
            # The interpreter has no SMs; one makes the heuristic split only tiny batches.
            self._num_sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                     if device.type == "cuda" else 1)
        return self._num_sms[device]

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      kv_cache: torch.Tensor) -> None:
        """Raise ValueError for inputs the kernels do not support (once per signature)."""
        signature = (query.shape[1:], key.shape, value.shape, kv_cache.shape[1:], query.dtype, key.dtype,
                     kv_cache.dtype, query.device, kv_cache.stride(4))
        if signature in self._checked:
            return
        if query.dim() != 3 or key.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
            raise ValueError("query/key/value must be (num_tokens, heads, head_dim) and kv_cache "
                             f"(num_blocks, 2, block_size, num_kv_heads, head_dim); got query {tuple(query.shape)}, "
                             f"kv_cache {tuple(kv_cache.shape)}")
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        num_tokens, num_heads, q_head_dim = query.shape
        if q_head_dim != head_dim or head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim: the triton backend supports powers of two in [16, 256], got "
                             f"query {q_head_dim} / kv_cache {head_dim}")
        if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape:
            raise ValueError(f"key/value: expected shape {(num_tokens, num_kv_heads, head_dim)}, "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if query.dtype not in SUPPORTED_DTYPES or kv_cache.dtype not in (query.dtype, torch.float8_e4m3fn):
            raise ValueError(f"dtype: query must be float16/bfloat16/float32 and kv_cache the same or fp8 "
                             f"(float8_e4m3fn), got {query.dtype} and {kv_cache.dtype}")
        if kv_cache.stride(4) != 1:
            raise ValueError("kv_cache must be contiguous along head_dim")
        if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"device: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), "
                             f"got {query.device}")
        self._checked.add(signature)

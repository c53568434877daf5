"""Triton kernels for the paged KV cache: the cache write and paged attention.

This module owns the GPU kernels and their thin launch wrappers; the choice of
path and tile sizes lives in ``triton_backend``. Only the Triton backend
imports this module, so the rest of pagedllm never imports triton.

Three kernels:

* ``_reshape_and_cache_kernel``: one program per new token copies its K and V
  (num_kv_heads, head_dim) into ``kv_cache[slot // block_size, {0,1},
  slot % block_size]``; a slot of -1 (CUDA-graph padding) writes nothing.
* ``_paged_attention_kernel``: flash-attention style (online softmax, fp32
  accumulation) over a ragged batch of query chunks, reading K/V through each
  sequence's block table. One program owns one KV head and a tile of
  ``BLOCK_M`` query rows, where a row is a (query token, query head) pair of
  that KV head's group, so a K/V tile is loaded once for the whole GQA group:

      rows of one program (QUERIES_PER_KV = 4, BLOCK_M = 16, BLOCK_Q = 4):
          row:   0  1  2  3 | 4  5  6  7 | ... | 12 13 14 15
          token: t  t  t  t | t+1 ...    | ... | t+3
          head:  0  1  2  3 | 0  1  2  3 | ... | 0  1  2  3   (+ kv_head * 4)

  In the general (mixed) mode, program axis 0 enumerates query blocks of all
  sequences; sequence s owns the block indices starting at
  ``query_start_loc[s] // BLOCK_Q + s``, an upper bound on the blocks of the
  sequences before it, so the grid size ``num_tokens // BLOCK_Q + num_seqs``
  and each program's sequence (a binary search) come without a host sync.
  In decode-only mode axis 0 is the sequence and axis 2 splits its context
  into ``NUM_SPLITS`` ranges (flash-decoding); each split writes an
  unnormalised partial output plus its running max and sum.
* ``_reduce_splits_kernel``: merges the decode partials of each (token, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, kv_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token: leave the cache alone
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    src_k = token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = block * stride_cb + offset * stride_ct + heads[:, None] * stride_ch + dims[None, :]
    dtype = kv_cache_ptr.dtype.element_ty
    k = tl.load(key_ptr + src_k, mask=mask)  # (BLOCK_H, HEAD_DIM)
    v = tl.load(value_ptr + src_v, mask=mask)
    tl.store(kv_cache_ptr + dst, k.to(dtype), mask=mask)
    tl.store(kv_cache_ptr + stride_ckv + dst, v.to(dtype), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    slot_mapping: torch.Tensor,  # (num_tokens,) int64, -1 = skip
) -> None:
    """Write each token's K/V into its cache slot; slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_SIZE=kv_cache.shape[2], HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
    )


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s with start(s) <= q_block_idx < start(s + 1), where
    start(s) = query_start_loc[s] // BLOCK_Q + s is strictly increasing."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, k_base, block_table, tile_lo, tile_hi, num_keys, row_pos, scale_log2,
    stride_cb, stride_ckv, stride_ct,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key tiles [tile_lo, tile_hi).
    Unmasked tiles must hold only keys that every query row may see."""
    dims = tl.arange(0, HEAD_DIM)
    for tile in range(tile_lo, tile_hi):
        pos = tile * TILE_N + tl.arange(0, TILE_N)
        if MASKED:
            key_valid = pos < num_keys
            block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        else:
            block_ids = tl.load(block_table + pos // BLOCK_SIZE).to(tl.int64)
        kv_offs = (block_ids * stride_cb + (pos % BLOCK_SIZE) * stride_ct)[:, None] + dims[None, :]
        if MASKED:
            k = tl.load(k_base + kv_offs, mask=key_valid[:, None], other=0.0)  # (TILE_N, HEAD_DIM)
        else:
            k = tl.load(k_base + kv_offs)
        k = k.to(q.dtype)  # an fp8 cache (--kv-cache-dtype fp8) widens here; a no-op otherwise
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, TILE_N)
        if MASKED:
            s = tl.where(key_valid[None, :] & (pos[None, :] <= row_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; shift by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(k_base + stride_ckv + kv_offs, mask=key_valid[:, None], other=0.0)
        else:
            v = tl.load(k_base + stride_ckv + kv_offs)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# num_seqs only bounds a search, and stride_bt is the batch's block-table width: specializing on them
# (== 1, divisible by 16) would compile a new variant for batches of a new kind in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, kv_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    num_seqs, num_heads, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_ct, stride_ch, stride_bt,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DECODE_ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // QUERIES_PER_KV  # query tokens per program
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:
        seq = tl.program_id(0)
        q_block = 0
    else:
        seq = _find_seq_idx(query_start_loc_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        q_block = tl.program_id(0) - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:  # spare block of the grid's upper bound, or a q_len == 0 row
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # query token i sits at position context_len + i

    rows = tl.arange(0, BLOCK_M)
    row_tok = q_block * BLOCK_Q + rows // QUERIES_PER_KV  # query index inside the sequence
    row_head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (row_tok < q_len)
    row_pos = context_len + row_tok
    dims = tl.arange(0, HEAD_DIM)
    q_offs = (q_start + row_tok).to(tl.int64)[:, None] * stride_qt + row_head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)

    # Keys visible to the last query row of this block; later ones are masked anyway.
    num_keys = tl.maximum(context_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len), 0)
    num_tiles = tl.cdiv(num_keys, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)  # the split count is fixed; the share follows seq_len
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = kv_cache_ptr + kv_head.to(tl.int64) * stride_ch
    # Tiles wholly at or before the first row's position are visible to every row: no masks there.
    num_full = tl.minimum((context_len + q_block * BLOCK_Q + 1) // TILE_N, tile_hi)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, block_table, tile_lo, num_full, num_keys, row_pos,
                                  scale_log2, stride_cb, stride_ckv, stride_ct,
                                  HEAD_DIM, BLOCK_SIZE, TILE_N, DOT_PRECISION, False)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, block_table, tl.maximum(tile_lo, num_full), tile_hi,
                                  num_keys, row_pos, scale_log2, stride_cb, stride_ckv, stride_ct,
                                  HEAD_DIM, BLOCK_SIZE, TILE_N, DOT_PRECISION, True)

    out_row = (q_start + row_tok).to(tl.int64)  # (BLOCK_M,) token index in the batch
    if NUM_SPLITS == 1:
        # Rows with no visible key (seq_lens == 0 padding) produce 0, not NaN.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_offs = out_row[:, None] * stride_ot + row_head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # partial_* are (num_tokens, num_heads, NUM_SPLITS[, HEAD_DIM]), contiguous.
        part = (out_row * num_heads + row_head) * NUM_SPLITS + split
        tl.store(partial_max_ptr + part, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + part, l_i, mask=row_valid)
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _reduce_splits_kernel(
    out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr, query_start_loc_ptr,
    num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == token:  # q_len == 0 padding row
        return
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (token.to(tl.int64) * num_heads + head) * NUM_SPLITS + splits
    m = tl.load(partial_max_ptr + part)  # (NUM_SPLITS,), -inf for an empty split
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(tl.load(partial_sum_ptr + part) * weight, 0)
    acc = tl.load(partial_out_ptr + part[:, None] * HEAD_DIM + dims[None, :])  # (NUM_SPLITS, HEAD_DIM)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def paged_attention(
    out: torch.Tensor,  # (num_tokens, num_heads, head_dim), written
    query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    block_tables: torch.Tensor,  # (num_seqs, max_num_blocks) int32
    seq_lens: torch.Tensor,  # (num_seqs,) int32
    query_start_loc: torch.Tensor,  # (num_seqs + 1,) int32
    scale: float,
    *,
    decode_only: bool,
    block_m: int,
    tile_n: int,
    num_splits: int = 1,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> None:
    """Causal attention of every query token over its sequence's cached K/V. ``decode_only``
    promises q_len <= 1 for every sequence; only then may ``num_splits`` (a power of two)
    exceed 1. Launches only: no host sync, so a decode-only call can be graph-captured."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = kv_cache.shape[3]
    queries_per_kv = num_heads // num_kv_heads
    if num_tokens == 0 or num_seqs == 0:
        return
    if num_splits > 1 and not decode_only:
        raise ValueError("num_splits: split-K is only defined for decode-only batches")
    if query.stride(2) != 1:
        query = query.contiguous()
    if decode_only:
        grid = (num_seqs, num_kv_heads, num_splits)
    else:
        grid = (num_tokens // (block_m // queries_per_kv) + num_seqs, num_kv_heads, 1)
    partial_out = partial_max = partial_sum = out  # unused by the kernel without splits
    if num_splits > 1:
        partial_out = query.new_empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32)
        partial_max = query.new_empty(num_tokens, num_heads, num_splits, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _paged_attention_kernel[grid](
        out, query, kv_cache, block_tables, seq_lens, query_start_loc,
        partial_out, partial_max, partial_sum,
        num_seqs, num_heads, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m, TILE_N=tile_n, NUM_SPLITS=num_splits, DECODE_ONLY=decode_only,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **extra,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, partial_out, partial_max, partial_sum, query_start_loc,
            num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4,
        )


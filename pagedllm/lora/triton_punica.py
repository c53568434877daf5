"""Triton SGMV kernel for batched LoRA (GPU path of ``punica.py``; Punica's segmented gather matmul).

The tokens of a step are grouped by adapter slot on the host (``sgmv_plan``): ``perm`` lists
token indices sorted by slot, and each *block* is up to ``BLOCK_M`` tokens of one slot
``(slot, start in perm, length)``. One program multiplies one block by its slot's weight
tile, so the tokens of an adapter share each weight load (a batch of 256 decodes over 8
adapters reads each adapter's weights about twice, not 32 times):

    y[perm[start:start+len], off:off+N] += x[perm[start:start+len]] @ W[slot].T     W: (slots, N, K)

Shrink is W = A (N = max_rank, K = in) into a zeroed fp32 buffer; expand is W = B (N = out,
K = max_rank) into the layer output at the shard's column offset. Blocks with slot -1 do
nothing, so the grid can have a fixed size (``num_blocks``): what a CUDA graph replays, the
plan living in the persistent input buffers.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tokens per block (tl.dot's minimum)


def num_plan_blocks(num_tokens: int, max_loras: int) -> int:
    """Blocks a plan of ``num_tokens`` tokens over at most ``max_loras`` slots can need."""
    return -(-num_tokens // BLOCK_M) + min(max_loras, num_tokens)


def sgmv_plan(token_slots: np.ndarray, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm (T,) int32: token indices sorted by slot, blocks (3, num_blocks) int32: slot / start / length
    of each block, slot -1 for unused ones). Tokens of slot -1 (the base model) are in no block."""
    order = np.argsort(token_slots, kind="stable")
    sorted_slots = token_slots[order]
    blocks = np.full((3, num_blocks), -1, dtype=np.int32)
    slots, starts, counts = np.unique(sorted_slots, return_index=True, return_counts=True)
    b = 0
    for slot, start, count in zip(slots.tolist(), starts.tolist(), counts.tolist()):
        if slot < 0:
            continue
        for s in range(start, start + count, BLOCK_M):
            blocks[:, b] = (slot, s, min(BLOCK_M, start + count - s))
            b += 1
    return order.astype(np.int32), blocks


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, y_ptr, perm_ptr, blocks_ptr, blocks_stride, N, K, K_PER_SPLIT,
                 stride_xt, stride_ws, stride_wn, stride_yt, y_offset,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 ATOMIC: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.load(blocks_ptr + b)
    if slot < 0:
        return
    start = tl.load(blocks_ptr + blocks_stride + b)
    length = tl.load(blocks_ptr + 2 * blocks_stride + b)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = tl.load(perm_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + slot.to(tl.int64) * stride_ws
    # tl.full, not tl.zeros: the interpreter cannot run tl.zeros once triton was imported before it was on.
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    k_begin = tl.program_id(2) * K_PER_SPLIT  # split-K: this program's share of the reduction
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None],
                    other=0.0)  # (BLOCK_K, BLOCK_N): W[slot].T's tile
        if IEEE:
            acc += tl.dot(x.to(w.dtype), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), w)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + y_offset + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:  # split-K partial sums into an fp32 output
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


def sgmv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor,
         num_blocks: int, offset: int = 0) -> None:
    """y[:, offset:offset+N] += W[slot of each token] @ x, in place, over the first ``num_blocks`` blocks
    of the plan (``blocks``: (3, capacity) int32). x: (T, K), w: (S, N, K), y: (T, >= offset+N).

    A long reduction (the shrink's K = the layer's input size) is split over up to 16 programs per
    tile, which add into y atomically: y must then be fp32 (the shrink's zeroed buffer)."""
    if x.stride(1) != 1 or w.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError("sgmv: x, w and y must be contiguous along their last dimension")
    n, k = w.shape[1], w.shape[2]
    block_n, block_k = _block(n), _block(k)
    k_per_split = triton.cdiv(max(block_k, triton.cdiv(k, 16)), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k > 1 and y.dtype != torch.float32:
        k_per_split, split_k = triton.cdiv(k, block_k) * block_k, 1
    grid = (num_blocks, triton.cdiv(n, block_n), split_k)
    _sgmv_kernel[grid](x, w, y, perm, blocks, blocks.stride(0), n, k, k_per_split, x.stride(0), w.stride(0),
                       w.stride(1), y.stride(0), offset, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
                       IEEE=w.dtype == torch.float32, ATOMIC=split_k > 1)


def add_lora_sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  perm: torch.Tensor, blocks: torch.Tensor, num_blocks: int, offset: int = 0) -> torch.Tensor:
    """Triton twin of ``punica.add_lora``: shrink into fp32 (T, max_rank), expand into y's columns."""
    h = torch.zeros(x.shape[0], lora_a.shape[1], device=x.device, dtype=torch.float32)
    sgmv(x, lora_a, h, perm, blocks, num_blocks)
    sgmv(h, lora_b, y, perm, blocks, num_blocks, offset)
    return y

"""Triton BGMV kernel for batched LoRA (GPU path of `punica.py`, same semantics).

One kernel serves both halves: `y[t, off:off+N] += W[slot[t]] @ x[t]` with W stacked as
(num_slots, N, K). Shrink is W = A (N = max_rank, K = in) into a zeroed fp32 buffer; expand is
W = B (N = out, K = max_rank) into the layer output at the shard's column offset. Slot -1
(base-model token, or a CUDA-graph pad row) masks the weight loads, so its row gets + 0.
Slot indices are read from a device tensor, so a captured graph replays with new adapters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bgmv_kernel(x_ptr, w_ptr, y_ptr, slots_ptr, N, K, stride_xt, stride_ws, stride_wn, stride_yt, y_offset,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t)
    # Row mask as a vector: the interpreter rejects a scalar bool mixed into a 2-D mask.
    n_valid = (offs_n < N) & ((tl.zeros([BLOCK_N], dtype=tl.int32) + slot) >= 0)
    w_base = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_ws
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t * stride_xt + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w_mask = n_valid[:, None] & (offs_k[None, :] < K)
        w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    y_ptrs = y_ptr + t * stride_yt + y_offset + offs_n
    y = tl.load(y_ptrs, mask=offs_n < N, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _bgmv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, offset: int = 0) -> None:
    """y[:, offset:offset+N] += W[slots] @ x, in place. x: (T, K), w: (S, N, K), y: (T, >= offset+N)."""
    x, w = x.contiguous(), w.contiguous()
    num_tokens, n, k = x.shape[0], w.shape[1], w.shape[2]
    block_n = min(64, triton.next_power_of_2(n))
    block_k = min(64, triton.next_power_of_2(k))
    grid = (num_tokens, triton.cdiv(n, block_n))
    _bgmv_kernel[grid](x, w, y, slots, n, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0), offset,
                       BLOCK_N=block_n, BLOCK_K=block_k)


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    slots: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Triton twin of `punica.add_lora`: shrink into fp32 (T, max_rank), expand into y."""
    if y.stride(1) != 1:
        raise ValueError("add_lora_triton: y must be contiguous along its last dimension")
    h = torch.zeros(x.shape[0], lora_a.shape[1], device=x.device, dtype=torch.float32)
    slots = slots.to(device=x.device, dtype=torch.int32)
    _bgmv(x, lora_a, h, slots)
    _bgmv(h, lora_b, y, slots, offset)
    return y

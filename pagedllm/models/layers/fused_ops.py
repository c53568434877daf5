"""Fused Triton kernels for the element-wise layers of a decoder block (GPU only).

Each op here replaces a chain of small PyTorch kernels with one launch:

    rms_norm / fused_add_rms_norm   ~7 kernels (float, pow, mean, rsqrt, mul, cast, scale) -> 1
    rotary_embedding (q and k)      ~16 kernels (2 gathers, casts, chunk, mul/sub/add, cat)   -> 1
    silu_and_mul                    2-3 kernels (silu, mul)                                   -> 1

That matters most in a decode step, where every op touches only a few KiB and
costs its launch (a CUDA graph removes the CPU side of a launch, not the
~2 µs a kernel takes to start and drain): the 8B model has 32 layers, so the
torch versions add about a thousand kernels per step. benchmarks/GPU_NOTES.md
has the measurement that kept them.

The layers (norm.py, rotary.py, activation.py) call these once
``kernels.select_kernels`` has chosen them, when the model is built on a CUDA
device; the torch code stays the reference and the CPU path. Arithmetic is
fp32 inside the kernels, one rounding to the model dtype at the end (the torch
path rounds after each op, so results differ by bf16 rounding, not more). Set
``PAGEDLLM_FUSED_OPS=0`` (read when the model is built) to turn them off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- RMSNorm ----------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, stride_x, stride_res, stride_out, stride_res_out, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The add is rounded to the model dtype, as the torch path's `x + residual`.
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # torch path: weight * (x * inv_rms).to(dtype); keep its intermediate rounding.
    y = (xf * inv_rms).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rmsnorm(x) (..., n); with ``residual``: (rmsnorm(x + residual), x + residual)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    rows = x2.shape[0]
    if residual is None:
        if rows:
            _rms_norm_kernel[(rows,)](x2, x2, weight, out, out, n, x2.stride(0), 0, out.stride(0), 0, eps,
                                      HAS_RESIDUAL=False, BLOCK=block, num_warps=num_warps)
        return out.view(shape)
    r2 = residual.reshape(-1, n)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, res_out, n, x2.stride(0), r2.stride(0), out.stride(0),
                                  res_out.stride(0), eps, HAS_RESIDUAL=True, BLOCK=block, num_warps=num_warps)
    return out.view(shape), res_out.view(shape)


# ---- rotary embedding (neox style) ------------------------------------------------------
@triton.jit
def _rope_rows(ptr, stride_t, stride_h, token, cos, sin, num_heads,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    p1 = ptr + token * stride_t + heads * stride_h + dims  # first half of each head
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(p1 + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cs_mask = dims < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=cs_mask, other=0.0).to(tl.float32)  # (1, BLOCK_D)
    sin = tl.load(sin_ptr + pos * stride_cos + dims, mask=cs_mask, other=0.0).to(tl.float32)
    _rope_rows(q_ptr, stride_qt, stride_qh, token, cos, sin, num_q_heads, HALF, BLOCK_QH, BLOCK_D)
    _rope_rows(k_ptr, stride_kt, stride_kh, token, cos, sin, num_k_heads, HALF, BLOCK_KH, BLOCK_D)


def rotary_embedding_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` (T, H, D) and ``key`` (T, KV, D) in place by each token's position.

    q and k may be strided views (slices of the fused qkv output); the last dim must be contiguous.
    ``cos_cache``/``sin_cache`` are (max_position, D // 2) fp32.
    """
    num_tokens, num_heads, head_dim = query.shape
    if num_tokens == 0:
        return query, key
    if query.stride(2) != 1 or key.stride(2) != 1:
        raise ValueError("rotary_embedding_: query and key must be contiguous along head_dim")
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos_cache, sin_cache, num_heads, key.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_cache.stride(0),
        HALF=half, BLOCK_QH=triton.next_power_of_2(num_heads), BLOCK_KH=triton.next_power_of_2(key.shape[1]),
        BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return query, key


# ---- SiLU and multiply --------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[gate | up]`` (..., 2d) -> silu(gate) * up (..., d)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, d, x2.stride(0), out.stride(0),
                                                                  BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], d)

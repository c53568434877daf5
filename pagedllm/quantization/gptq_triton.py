"""GPTQ/AWQ matmul on the GPU in Triton: ``y = x @ W^T`` from the packed weight (W4A16, W8A16).

The weight is in the layout every GPTQ/AWQ layer is kept in (gptq.py):

    qweight (K / pack, N) int32   codes packed along the input, low bits first
    scales  (G, N)                per group of inputs and output column
    zeros   (G, N)                the zero point, unpacked, in the scales' dtype
    g_idx   (K,) int32            the group of each input (act-order)

Two kernels, chosen by the number of rows M (measured on an H200, Llama-3-8B shapes: README,
"GPTQ / AWQ checkpoints"):

    M <= 16 (decode)  ``_gemm_kernel``: each program loads a (BLOCK_K / pack, BLOCK_N) tile of words
        once and, for each of the ``pack`` codes in a word, dequantizes a (BLOCK_K / pack, BLOCK_N)
        slice in registers and multiplies it by the matching strided columns of x:
            for j < pack:  w = (((words >> bits * j) & mask) - zero) * scale     (fp32, cast to x's dtype)
                           acc += x[:, pack * r + j] @ w                         (fp32 accumulate)
        The inputs are split over ``SPLIT_K`` programs (decode has few output tiles), whose fp32
        partial sums are added afterwards in a fixed order (no atomics).
    M > 16            ``_dequantize_kernel`` writes the (K, N) weight in x's dtype, then cuBLAS: the
        dequantization is paid once for all rows, and cuBLAS's GEMM beats a Triton GEMM with
        dequantization inside from M = 64 on.

Scales and zeros (``GROUPS``): a tile whose inputs share one group (groups in input order,
BLOCK_K dividing group_size) reads one row; with smaller groups, one row per word row (a word's
inputs share a group); act-order reads each input's row through g_idx, inside the loop over the
codes of a word (about twice the time at batch 1).

The kernels call only triton.language builtins (``tl.full``, not the jit-defined ``tl.zeros``),
so the CPU tests can reload this module under TRITON_INTERPRET=1 after triton was imported.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

GEMM_MAX_ROWS = 16  # above: dequantize once, then cuBLAS


@triton.jit
def _gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr,
    M, N, K, stride_xm, stride_ys, stride_ym, group_size,
    BITS: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PACK: tl.constexpr = 32 // BITS
    WORD_ROWS: tl.constexpr = BLOCK_K // PACK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rows = k0 // PACK + tl.arange(0, WORD_ROWS)  # word rows of this tile
        mask_r = rows < K // PACK
        mask_w = mask_r[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask_w, other=0)
        if GROUPS == 0:  # one group for the whole tile
            at = (k0 // group_size).to(tl.int64) * N + offs_n
            s = tl.load(scales_ptr + at, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zeros_ptr + at, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        elif GROUPS == 1:  # one group per word row (the pack inputs of a word share it)
            at = (rows * PACK // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]
            s = tl.load(scales_ptr + at, mask=mask_w, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + at, mask=mask_w, other=0.0).to(tl.float32)
        for j in tl.static_range(PACK):
            k = rows * PACK + j  # the inputs held in bits [BITS * j, BITS * (j + 1)) of each word
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if GROUPS == 2:  # act-order: a group per input, from g_idx
                g = tl.load(g_idx_ptr + k, mask=mask_r, other=0).to(tl.int64)
                at = g[:, None] * N + offs_n[None, :]
                s = tl.load(scales_ptr + at, mask=mask_w, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + at, mask=mask_w, other=0.0).to(tl.float32)
            q = (words >> (j * BITS)) & ((1 << BITS) - 1)
            w = ((q.to(tl.float32) - z) * s).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
    y = y_ptr + pid_k * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, w_ptr, N, K, group_size,
    BITS: tl.constexpr, ACT_ORDER: tl.constexpr, WORD_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(K, N) weight, row k = input k: each program unpacks (WORD_ROWS, BLOCK_N) words."""
    PACK: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * WORD_ROWS + tl.arange(0, WORD_ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < K // PACK
    mask = mask_r[:, None] & (offs_n < N)[None, :]
    words = tl.load(qweight_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0)
    if not ACT_ORDER:  # the pack inputs of a word share a group
        at = (rows * PACK // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]
        s = tl.load(scales_ptr + at, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + at, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(PACK):
        k = rows * PACK + j
        if ACT_ORDER:
            g = tl.load(g_idx_ptr + k, mask=mask_r, other=0).to(tl.int64)
            at = g[:, None] * N + offs_n[None, :]
            s = tl.load(scales_ptr + at, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + at, mask=mask, other=0.0).to(tl.float32)
        q = (words >> (j * BITS)) & ((1 << BITS) - 1)
        w = (q.to(tl.float32) - z) * s
        tl.store(w_ptr + k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_config(m: int, n: int, k: int, bits: int, device: torch.device) -> dict:
    """Tiles and split-K of ``_gemm_kernel`` for an (m, k) x (k, n) product: 16 x 128 output tiles,
    128 inputs a step, split-K until about 4 programs an SM (at most 8 splits, 4 steps each)."""
    block_m, block_n, block_k = 16, 128, 128 if bits == 4 else 64  # 16 word rows: the least tl.dot takes
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while split_k < 8 and tiles * split_k < 4 * _num_sms(device) and k // (block_k * split_k * 2) >= 4:
        split_k *= 2
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=3)


def _groups_mode(bits: int, group_size: int, act_order: bool, block_k: int) -> int:
    """Where a tile reads scales and zeros: 0 one row for the tile, 1 a row per word row, 2 a row per input
    (g_idx; also for groups that split a word, which GPTQ's 32/64/128 never do)."""
    if act_order or group_size % (32 // bits):
        return 2
    return 0 if block_k and group_size % block_k == 0 else 1


def gptq_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
    bits: int, group_size: int, act_order: bool, config: dict | None = None,
) -> torch.Tensor:
    """``x`` (M, K) -> (M, N) in x's dtype with dequantization in the kernel (meant for small M);
    ``group_size`` is the inputs per group (K for one group); ``act_order`` reads each input's group
    from ``g_idx``; ``config`` overrides ``gemm_config``'s choice."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    cfg = gemm_config(m, n, k, bits, x.device)
    cfg.update(config or {})
    block_m, block_n, block_k, split_k = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["split_k"]
    y = torch.empty((split_k, m, n), dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _gemm_kernel[grid](
        x, qweight, scales, zeros, g_idx, y, m, n, k, x.stride(0), y.stride(0), y.stride(1), group_size,
        BITS=bits, GROUPS=_groups_mode(bits, group_size, act_order, block_k), SPLIT_K=split_k,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y[0] if split_k == 1 else y.sum(dim=0).to(x.dtype)


def dequantize_triton(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
    bits: int, group_size: int, act_order: bool, dtype: torch.dtype,
) -> torch.Tensor:
    """The (K, N) weight in ``dtype`` (W transposed: ``x @ result`` is the layer's matmul)."""
    pack = 32 // bits
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    word_rows, block_n = 16, 256
    grid = (triton.cdiv(k // pack, word_rows), triton.cdiv(n, block_n))
    act_order = _groups_mode(bits, group_size, act_order, 0) == 2
    _dequantize_kernel[grid](qweight, scales, zeros, g_idx, w, n, k, group_size, BITS=bits, ACT_ORDER=act_order,
                             WORD_ROWS=word_rows, BLOCK_N=block_n, num_warps=4)
    return w


def gptq_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
    bits: int, group_size: int, act_order: bool,
) -> torch.Tensor:
    """``x`` (M, K) -> (M, N): the in-kernel GEMM for M <= GEMM_MAX_ROWS, else dequantize + cuBLAS."""
    if x.shape[0] <= GEMM_MAX_ROWS:
        return gptq_gemm(x, qweight, scales, zeros, g_idx, bits, group_size, act_order)
    return x @ dequantize_triton(qweight, scales, zeros, g_idx, bits, group_size, act_order, x.dtype)

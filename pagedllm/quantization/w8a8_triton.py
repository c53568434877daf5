"""Per-token activation quantization for W8A8 in one Triton launch (GPU).

The torch version (``w8a8._quantize_tokens``) is five kernels over the activations (abs, amax,
divide, clamp/round, cast) and an fp32 copy; in a decode step that is five launches per linear
layer, in a prefill five passes over a large tensor. Here each program quantizes one row:

    scale[r] = max(max|x[r, :]|, 1e-12) / qmax        q[r, :] = x[r, :] / scale[r]  (clamped, cast)

int8 rounds half away from zero (torch.round rounds half to even: the two differ only on exact
halves). The torch version stays the reference and the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, stride_x, stride_q, qmax,
                          IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / qmax
    q = tl.minimum(tl.maximum(x / scale, -qmax), qmax)
    if IS_INT8:
        q = tl.where(q >= 0, q + 0.5, q - 0.5)  # the cast truncates toward zero: round half away from zero
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_tokens(x: torch.Tensor, qdtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, n) -> (q (rows, n) ``qdtype``, scale (rows, 1) float32)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=qdtype, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _quantize_rows_kernel[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), qmax,
                                       IS_INT8=qdtype == torch.int8, BLOCK=block,
                                       num_warps=min(max(block // 512, 1), 16))
    return q, scale

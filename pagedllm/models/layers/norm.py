"""RMSNorm, with the residual add of the next sub-layer fused into it.

Decoder layers pass the running residual through their norms:

    x, residual = norm(x, residual)   # residual <- x + residual; x <- rmsnorm(residual)

so the add and the normalisation read the activations once. Statistics are
taken in fp32 and the result cast back, as HF's LlamaRMSNorm does.

On CUDA, ``kernels.select_kernels`` swaps in one fused Triton kernel (fused_ops.py)
for the ~7 torch kernels, once, when the model is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedllm.models.layers.kernels import load_fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self._fused: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None = None

    def use_fused_kernels(self, enabled: bool) -> None:
        """Run the fused Triton RMSNorm (+ residual add) instead of torch; set once, at model build."""
        self._fused = load_fused_ops().rms_norm if enabled else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` (..., hidden) -> rmsnorm(x); with ``residual``: (rmsnorm(x + residual), x + residual)."""
        if self._fused is not None:
            return self._fused(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        # The add happens in the model dtype, like HF's `residual + hidden_states`.
        x = x + residual
        return self._norm(x), x

"""RMSNorm, with the residual add of the next sub-layer fused into it.

Decoder layers pass the running residual through their norms:

    x, residual = norm(x, residual)   # residual <- x + residual; x <- rmsnorm(residual)

so the add and the normalisation read the activations once. Statistics are
taken in fp32 and the result cast back, as HF's LlamaRMSNorm does.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` (..., hidden) -> rmsnorm(x); with ``residual``: (rmsnorm(x + residual), x + residual)."""
        if x.is_cuda:
            from pagedllm.models.layers import fused_ops

            if fused_ops.fused_ops_enabled(x):  # one Triton kernel instead of ~7 (fused_ops.py)
                return fused_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        # The add happens in the model dtype, like HF's `residual + hidden_states`.
        x = x + residual
        return self._norm(x), x

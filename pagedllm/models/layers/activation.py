"""Gated activation of the Llama-family MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[gate | up]`` along the last dim: (..., 2d) -> (..., d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pagedllm.models.layers import fused_ops

            if fused_ops.fused_ops_enabled(x):  # one kernel instead of silu + mul (fused_ops.py)
                return fused_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

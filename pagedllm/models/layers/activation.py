"""Gated activation of the Llama-family MLP (torch, or the fused kernel chosen by kernels.select_kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.models.layers.kernels import load_fused_ops


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[gate | up]`` along the last dim: (..., 2d) -> (..., d)."""

    def __init__(self) -> None:
        super().__init__()
        self._fused: Callable[[torch.Tensor], torch.Tensor] | None = None

    def use_fused_kernels(self, enabled: bool) -> None:
        """Run one Triton kernel instead of silu + mul (fused_ops.py); set once, at model build."""
        self._fused = load_fused_ops().silu_and_mul if enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


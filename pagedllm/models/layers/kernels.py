"""Which implementation the element-wise layers run: the fused Triton kernels or torch.

The choice is made once, when the model is built (``load_model`` calls
``select_kernels``), never per call: RMSNorm, RotaryEmbedding and SiluAndMul
start on their torch code, which is the reference and the CPU path, and
``select_kernels`` hands each of them its fused kernel (fused_ops.py) when the
model lives on a CUDA device and ``PAGEDLLM_FUSED_OPS`` is not "0".

A layer takes part by defining ``use_fused_kernels(enabled: bool)``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import nn

FUSED_OPS_ENV = "PAGEDLLM_FUSED_OPS"


def fused_kernels_wanted(device: torch.device | str) -> bool:
    """True on a CUDA device unless ``PAGEDLLM_FUSED_OPS=0`` (read here, at build time only)."""
    return torch.device(device).type == "cuda" and os.environ.get(FUSED_OPS_ENV, "1") != "0"


def select_kernels(model: nn.Module, device: torch.device | str, fused: bool | None = None) -> bool:
    """Give every element-wise layer of ``model`` its implementation; returns whether they are fused.

    ``fused`` None decides from ``device`` and the environment (``fused_kernels_wanted``).
    """
    if fused is None:
        fused = fused_kernels_wanted(device)
    for module in model.modules():
        use_fused = getattr(module, "use_fused_kernels", None)
        if use_fused is not None:
            use_fused(fused)
    return fused


def load_fused_ops() -> ModuleType:
    """The fused_ops module, imported on first use: it imports triton, which the CPU path does not need."""
    from pagedllm.models.layers import fused_ops as module

    return module

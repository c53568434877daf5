"""``cpu_bf16``: dense weights stored in bfloat16, activations in the model dtype (float32), for CPUs.

A batch-1 decode step on the CPU is bound by memory bandwidth: it reads every
weight once (~0.54 GB in float32 for SmolLM2-135M) to do two flops per weight.
Keeping the weights in bfloat16 halves those bytes, and oneDNN's bf16 GEMV is as
fast per byte as the fp32 one, so small batches go straight through a bf16 matmul
(the activations are rounded to bf16 on the way in, the output comes back in
float32). CPUs without native bf16 arithmetic (AVX2 only, no AVX512-BF16 / AMX)
emulate the bf16 GEMM, which for a prefill-sized batch is several times slower
than fp32; there the weight is widened to float32 for the one matmul instead,
which costs one pass over the weight, small next to a large GEMM.

    rows of x <= gemv_rows   y = linear(x.bf16, W_bf16).float()    (decode)
    otherwise                y = linear(x.bf16.float(), W_bf16.float()).bf16.float()   (prefill)

Memory: half the weights of float32, the embedding / LM head matrix included
(``get_embedding_method``). Accuracy: bf16 keeps
8 bits of mantissa; docs/CPU.md has the measured greedy agreement and perplexity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.quantization.base import (
    QuantizationConfig,
    QuantizationMethod,
    UnquantizedLinearMethod,
    WeightLoader,
    copy_weight,
)

# Above this many rows the weight is widened to fp32 unless the CPU has native bf16 (AMX / AVX512-BF16).
# 16 covers batch-1 decode and small decode batches; measured crossover on an AVX2 EPYC: see docs/CPU.md.
DEFAULT_GEMV_ROWS = 16


def native_bf16_matmul() -> bool:
    """True when oneDNN runs bf16 GEMMs in hardware (AMX tiles or AVX512-BF16), not emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(torch.cpu._is_amx_tile_supported()) or capability == "AVX512_BF16"


class CpuBf16LinearMethod(QuantizationMethod):
    """``weight`` (output_size, input_size) in bfloat16; bias and activations in the model dtype."""

    def __init__(self, gemv_rows: int) -> None:
        self.gemv_rows = gemv_rows

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        UnquantizedLinearMethod().create_weights(layer, input_size, output_size, bias, weight_loader)
        layer.weight.data = layer.weight.data.to(torch.bfloat16)

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        dst = param.data if output_span is None else param.data.narrow(0, *output_span)
        copy_weight(dst, loaded_weight)  # copy_ rounds to the parameter's dtype (bf16 for the weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        if x.dtype == weight.dtype:
            return F.linear(x, weight, bias)
        if x.numel() // x.shape[-1] <= self.gemv_rows:
            y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
            return y if bias is None else y + bias
        # Input and output rounded to bf16 as the GEMV path rounds them, so a row's result does not depend
        # on how many rows share its batch (a request recomputed in a prefill sees what its decode saw).
        y = F.linear(x.to(weight.dtype).to(x.dtype), weight.to(x.dtype)).to(weight.dtype).to(x.dtype)
        return y if bias is None else y + bias


class CpuBf16Config(QuantizationConfig):
    """Every linear layer keeps its weight in bfloat16 (``quantization="cpu_bf16"``)."""

    name = "cpu_bf16"

    def __init__(self, gemv_rows: int = DEFAULT_GEMV_ROWS) -> None:
        # With native bf16 GEMMs every batch size stays in bf16 (no widening pass).
        self.gemv_rows = 1 << 62 if native_bf16_matmul() else gemv_rows

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> CpuBf16Config:
        return cls(int(hf_quant_config.get("gemv_rows", DEFAULT_GEMV_ROWS)))

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return CpuBf16LinearMethod(self.gemv_rows)

    def get_embedding_method(self) -> QuantizationMethod:
        # The LM head is the largest matrix of a small model (SmolLM2: 28M of 135M weights).
        return CpuBf16LinearMethod(self.gemv_rows)

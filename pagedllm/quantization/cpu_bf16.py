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

int4 for decode steps (``int4_seqs`` > 0; on by default for a GGUF whose linear
weights are 4-bit, ``model_loader``): each linear also keeps its weight as 4-bit
integers in groups of 32 with a bf16 scale and zero point, packed for
``torch._weight_int4pack_mm_for_cpu``, a quarter of the bf16 bytes. A step of
at most ``int4_seqs`` sequences that are all past their prompts (decodes,
speculative verification: ``StepShape``) multiplies by it; every other step by
the bf16 weight. The choice is per step, not per matmul size, so a decode and
the verification of its drafts use the same weights (speculative greedy output
equals plain greedy output), and a prompt's tokens always go through bf16,
whether it is prefilled whole or in chunks (a short last chunk included). The
4-bit values are the file's own: the GGUF loader hands a Q4_0, Q4_1 or Q4_K
matrix over with its codes, per-32 scales and offsets (``INT4_CODES``,
``loader/gguf_dequant.int4_parts``: ``codes * scale + low`` is the dequantized
weight bit for bit), and only the scale and zero point round to bf16. A layer
loaded without codes (another type, e.g. a Q4_K_M file's Q6_K layers) stays bf16.

    decode step of <= int4_seqs seqs     y = int4pack_mm(x.bf16, Q4, scale|zero).float()
    otherwise                            the bf16 rules above
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.loader.gguf_dequant import INT4_CODES
from pagedllm.quantization.base import (
    QuantizationConfig,
    QuantizationMethod,
    UnquantizedLinearMethod,
    WeightLoader,
    copy_weight,
    current_step_shape,
)

# Above this many rows the weight is widened to fp32 unless the CPU has native bf16 (AMX / AVX512-BF16).
# 16 covers batch-1 decode and small decode batches; measured crossover on an AVX2 EPYC: see docs/CPU.md.
DEFAULT_GEMV_ROWS = 16
# int4: steps of at most this many sequences (decodes / verifications) use the int4 weights. Measured on an
# AVX-512 Xeon (docs/CPU.md): SmolLM2's linears in ms at 1 / 4 / 8 / 12 rows, int4 6.8 / 9.2 / 15.1 / 20.7,
# bf16 22.8 / 23.2 / 23.0 / 23.8; 8 requests decode 148 -> 195 tok/s with 8 instead of 4 here.
DEFAULT_INT4_SEQS = 8
INT4_GROUP = 32


def native_bf16_matmul() -> bool:
    """True when oneDNN runs bf16 GEMMs in hardware (AMX tiles or AVX512-BF16), not emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(torch.cpu._is_amx_tile_supported()) or capability == "AVX512_BF16"


class CpuBf16LinearMethod(QuantizationMethod):
    """``weight`` (output_size, input_size) in bfloat16; bias and activations in the model dtype. With
    ``int4_seqs``, also ``int4_weight`` (packed codes) and ``int4_scale_zero`` (k / 32, n, 2) bf16 buffers,
    filled once every row of the weight is loaded."""

    def __init__(self, gemv_rows: int, int4_seqs: int = 0) -> None:
        self.gemv_rows = gemv_rows
        self.int4_seqs = int4_seqs

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        UnquantizedLinearMethod().create_weights(layer, input_size, output_size, bias, weight_loader)
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
        # The packing kernel takes whole groups of inputs and outputs in multiples of 16.
        if self.int4_seqs and input_size % INT4_GROUP == 0 and output_size % 16 == 0:
            layer.register_buffer("int4_weight", None, persistent=False)
            layer.register_buffer("int4_scale_zero", None, persistent=False)
            # Codes, scales and minimums of the rows loaded so far (a fused layer loads by shards).
            layer.int4_staging = (torch.empty(output_size, input_size, dtype=torch.uint8),
                                  torch.empty(2, output_size, input_size // INT4_GROUP))
            layer.int4_rows_loaded = 0

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        dst = param.data if output_span is None else param.data.narrow(0, *output_span)
        copy_weight(dst, loaded_weight)  # copy_ rounds to the parameter's dtype (bf16 for the weight)
        if param is layer.weight and getattr(layer, "int4_staging", None) is not None:
            self._stage_int4(layer, loaded_weight, output_span or (0, dst.shape[0]))

    @staticmethod
    def _stage_int4(layer: nn.Module, loaded_weight: torch.Tensor, span: tuple[int, int]) -> None:
        """Stage these rows' codes (from the checkpoint, ``INT4_CODES``); pack once all are in. Rows loaded
        without codes keep the layer bf16."""
        parts = getattr(loaded_weight, INT4_CODES, None)
        if parts is None:
            layer.int4_staging = None  # int4_weight stays None: every step multiplies by the bf16 weight
            return
        codes, params = layer.int4_staging
        q, scale, low = parts
        codes.narrow(0, *span).copy_(q)
        params[0].narrow(0, *span).copy_(scale)
        params[1].narrow(0, *span).copy_(low)
        layer.int4_rows_loaded += span[1]
        if layer.int4_rows_loaded < codes.shape[0]:
            return
        # The kernel computes w = (code - 8) * scale + zero: zero = min + 8 * scale.
        scale, low = params[0], params[1]
        layer.int4_scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)  # (k / 32, n, 2)
        layer.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        layer.int4_staging = None

    def uses_int4(self, layer: nn.Module, rows: int) -> bool:
        """Whether this step multiplies by the int4 weight (see the module docstring)."""
        if not self.int4_seqs or getattr(layer, "int4_weight", None) is None:
            return False
        shape = current_step_shape()
        if shape is None:  # called outside a model runner's step: by the matmul's rows
            return rows <= self.int4_seqs
        return shape.decoding and shape.num_seqs <= self.int4_seqs

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        rows = x.numel() // x.shape[-1]
        if self.uses_int4(layer, rows):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(rows, x.shape[-1]).to(torch.bfloat16), layer.int4_weight, INT4_GROUP,
                layer.int4_scale_zero).view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
            return y if bias is None else y + bias
        if x.dtype == weight.dtype:
            return F.linear(x, weight, bias)
        if rows <= self.gemv_rows:
            y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
            return y if bias is None else y + bias
        # Input and output rounded to bf16 as the GEMV path rounds them, so a row's result does not depend
        # on how many rows share its batch (a request recomputed in a prefill sees what its decode saw).
        y = F.linear(x.to(weight.dtype).to(x.dtype), weight.to(x.dtype)).to(weight.dtype).to(x.dtype)
        return y if bias is None else y + bias


class CpuBf16Config(QuantizationConfig):
    """Every linear layer keeps its weight in bfloat16 (``quantization="cpu_bf16"``)."""

    name = "cpu_bf16"

    def __init__(self, gemv_rows: int = DEFAULT_GEMV_ROWS, int4_seqs: int = 0) -> None:
        # With native bf16 GEMMs every batch size stays in bf16 (no widening pass).
        self.gemv_rows = 1 << 62 if native_bf16_matmul() else gemv_rows
        self.int4_seqs = int4_seqs  # 0: no int4 copy (model_loader passes int4_seqs for a 4-bit GGUF)
        self.needs_int4_codes = int4_seqs > 0

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> CpuBf16Config:
        return cls(int(hf_quant_config.get("gemv_rows", DEFAULT_GEMV_ROWS)),
                   int(hf_quant_config.get("int4_seqs", 0)))

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return CpuBf16LinearMethod(self.gemv_rows, self.int4_seqs)

    def get_embedding_method(self) -> QuantizationMethod:
        # The LM head is the largest matrix of a small model (SmolLM2: 28M of 135M weights).
        return CpuBf16LinearMethod(self.gemv_rows)

"""``fp8`` and ``int8``: 8-bit weights with one scale per output channel, 8-bit dynamic activations.

    weight        (output_size, input_size) float8_e4m3fn or int8
    weight_scale  (output_size,) float32: W ≈ weight * weight_scale[:, None]

A bf16/fp32 checkpoint is quantized as it loads (round to nearest, each output row scaled to
the format's largest value): per-row scales make each shard of a fused layer (q/k/v,
gate/up) and each tensor-parallel slice independent, so they quantize as they arrive. An FP8
checkpoint (compressed-tensors ``float-quantized`` or HF ``fp8``, per-channel or per-tensor
weight scales) loads as is, a per-tensor scale spread over its shard's rows.

The matmul, per device:
    fp8 on CUDA (compute capability >= 8.9)  activations quantized per token (dynamic) and
        ``torch._scaled_mm`` with row-wise scales (fp8 tensor cores), output in the model dtype
    int8 on CUDA  per-token int8 activations and ``torch._int_mm`` (int32 accumulate), scaled
    int8 on the CPU  weight-only: ``torch._weight_int8pack_mm`` (bf16 activations in, int8 weights)
    elsewhere  the weight dequantized for the matmul (a correctness fallback, not a fast path)

Activation scales are per token: ``s_x = max|x_row| / qmax`` (no calibration, as vLLM's
dynamic FP8). Accuracy: see README ("Quantization").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.quantization.base import (
    QuantizationConfig,
    QuantizationMethod,
    WeightLoader,
    copy_weight,
    register_bias,
)

_FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}


def quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): each row of ``w`` scaled so its largest magnitude is the format's largest value."""
    dtype, qmax = _FORMATS[fmt]
    w = w.float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / qmax
    q = w / scale[:, None]
    q = q.round().clamp(-qmax, qmax) if fmt == "int8" else q.clamp(-qmax, qmax)
    return q.to(dtype), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def _quantize_tokens(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic quantization of activations: (q, scale (rows, 1) float32).
    One Triton launch on CUDA (w8a8_triton.py); this torch code is its reference."""
    dtype, qmax = _FORMATS[fmt]
    if x.is_cuda:
        from pagedllm.quantization.w8a8_triton import quantize_tokens

        return quantize_tokens(x, dtype, qmax)
    return _quantize_tokens_torch(x, fmt)


def _quantize_tokens_torch(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, qmax = _FORMATS[fmt]
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / qmax
    q = x.float() / scale
    q = q.round().clamp(-qmax, qmax) if fmt == "int8" else q.clamp(-qmax, qmax)
    return q.to(dtype), scale


class W8A8LinearMethod(QuantizationMethod):
    """8-bit ``weight`` with per-output-channel ``weight_scale``; see the module docstring."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.qdtype = _FORMATS[fmt][0]

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        layer.weight = nn.Parameter(torch.zeros(output_size, input_size, dtype=self.qdtype), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(output_size, dtype=torch.float32), requires_grad=False)
        # Filled by quantizing a float checkpoint's weight; an FP8 checkpoint brings its own.
        layer.weight_scale.derived_from_weight = True
        for p in (layer.weight, layer.weight_scale):
            p.weight_loader = weight_loader
        register_bias(layer, output_size, bias, weight_loader)

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        dst = param.data if output_span is None else param.data.narrow(0, *output_span)
        if param is layer.weight_scale:  # a checkpoint's scale: per tensor (one value) or per channel
            scale = loaded_weight.float().reshape(-1)
            copy_weight(dst, scale.expand(dst.shape[0]) if scale.numel() == 1 else scale)
            return
        if param is not layer.weight:  # the bias
            copy_weight(dst, loaded_weight)
            return
        if loaded_weight.dtype == self.qdtype:  # already quantized: its scale arrives as weight_scale
            copy_weight(dst, loaded_weight)
            return
        if loaded_weight.dtype in (torch.float8_e4m3fn, torch.int8):
            raise ValueError(f"a {loaded_weight.dtype} weight cannot load into quantization={self.fmt}")
        q, scale = quantize_rows(loaded_weight.to(dst.device), self.fmt)
        copy_weight(dst, q)
        scale_dst = layer.weight_scale.data
        copy_weight(scale_dst if output_span is None else scale_dst.narrow(0, *output_span), scale)

    @torch.no_grad()
    def init_dummy(self, layer: nn.Module, generator: torch.Generator, bound: float) -> None:
        """Random weights (uniform in +-bound) quantized as a float checkpoint would be."""
        w = torch.empty(layer.weight.shape, device=layer.weight.device)
        w.uniform_(-bound, bound, generator=generator)
        q, scale = quantize_rows(w, self.fmt)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if layer.bias is not None:
            layer.bias.data.uniform_(-bound, bound, generator=generator)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda and self.fmt == "fp8" and _has_fp8_tensor_cores(x.device):
            y = self._fp8_scaled_mm(layer, x2)
        elif x.is_cuda and self.fmt == "int8":
            y = self._int8_mm(layer, x2)
        elif not x.is_cuda and self.fmt == "int8":
            y = self._int8_weight_only_cpu(layer, x2)
        else:
            y = F.linear(x2, dequantize_rows(layer.weight, layer.weight_scale, x.dtype))
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias

    def _fp8_scaled_mm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = _quantize_tokens(x, "fp8")
        return torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale[None, :],
                                out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16).to(x.dtype)

    def _int8_mm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = _quantize_tokens(x, "int8")
        m = xq.shape[0]
        if m <= 16:  # _int_mm needs more than 16 rows: pad the batch
            xq = F.pad(xq, (0, 0, 0, 17 - m))
        acc = torch._int_mm(xq, layer.weight.t())[:m]
        return (acc.float() * x_scale * layer.weight_scale[None, :]).to(x.dtype)

    def _int8_weight_only_cpu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Weight-only: the activations stay bf16, the int8 weight is widened tile by tile in the kernel.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.weight, layer.weight_scale.to(
            torch.bfloat16))
        return y.to(x.dtype)


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


class W8A8Config(QuantizationConfig):
    """``quantization="fp8"`` or ``"int8"``: every decoder linear layer in 8 bits; the embedding
    and LM head stay in the model dtype (their rows are gathered / they set the logits)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.name = fmt

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> W8A8Config:
        return cls(_format_of(hf_quant_config) or "fp8")

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return W8A8LinearMethod(self.fmt)


class Fp8Config(W8A8Config):
    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> Fp8Config:
        fmt = _format_of(hf_quant_config)
        if fmt not in (None, "fp8"):
            raise ValueError(f"quantization=fp8 cannot load a {fmt} checkpoint")
        return cls("fp8")


class Int8Config(W8A8Config):
    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> Int8Config:
        fmt = _format_of(hf_quant_config)
        if fmt not in (None, "int8"):
            raise ValueError(f"quantization=int8 cannot load a {fmt} checkpoint")
        return cls("int8")


def _format_of(hf_quant_config: dict[str, Any]) -> str | None:
    """The weight format a checkpoint's ``quantization_config`` declares: fp8, int8, or None (none)."""
    if not hf_quant_config:
        return None
    method = hf_quant_config.get("quant_method")
    if method == "fp8":
        if hf_quant_config.get("weight_block_size"):
            raise ValueError("quantization_config: block-wise FP8 (weight_block_size) is not supported yet; "
                             "per-channel and per-tensor FP8 are")
        return "fp8"
    if method == "compressed-tensors":
        groups = hf_quant_config.get("config_groups") or {}
        for group in groups.values():
            weights = group.get("weights") or {}
            kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
            if bits != 8 or strategy not in ("channel", "tensor"):
                raise ValueError(f"quantization_config: compressed-tensors weights {weights} are not supported; "
                                 "8-bit per-channel or per-tensor float/int are")
            return "fp8" if kind == "float" else "int8"
    raise ValueError(f"quantization_config: quant_method {method!r} is not supported by fp8/int8")

"""``gptq`` / ``awq``: 4-bit (gptq also 8-bit) weights, one scale and zero point per group of inputs.

Weights are stored packed in int32 as the published formats lay them out:

    gptq   qweight (input_size / pack, output_size): input i of column j sits in word i // pack,
           bits [b * (i % pack), b * (i % pack + 1))   (AutoGPTQ / GPTQModel)
    awq    qweight (input_size, output_size / 8): nibble k of word j holds column 8 j + AWQ_ORDER[k]
           (AutoAWQ's GEMM layout interleaves the 8 columns of a word)

and dequantized as ``w = scale * (q - zero)`` per group of ``group_size`` inputs. This module
quantizes a float checkpoint at load with round-to-nearest per group (``--quantization gptq|awq``),
so a model can be served, and benchmarked on dummy weights, in 4 bits. Loading the
``qweight``/``qzeros``/``scales`` tensors of a GPTQ/AWQ checkpoint is not supported yet.
The matmul dequantizes the layer's weight to the activation dtype and runs a dense GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.quantization.base import QuantizationConfig, QuantizationMethod, WeightLoader

# 64, not GPTQ's usual 128: it divides SmolLM2's hidden size 576 (and Llama-3-8B's 4096, 14336).
DEFAULT_GROUP_SIZE = 64
DUMMY_SCALE = 0.02 / 8  # dummy weights: 4-bit codes 0..15 around zero 8 land in +-0.02, as dense dummies do
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds column AWQ_ORDER[k] of its 8


def pack_gptq(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(input, output) integer codes -> GPTQ qweight (input / pack, output) int32, packed along the input."""
    pack = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0] // pack, pack, q.shape[1])
    shifts = (torch.arange(pack, device=q.device) * bits).view(1, pack, 1)
    return _to_int32((q << shifts).sum(dim=1))


def unpack_gptq(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight -> (input, output) codes in int32."""
    pack = 32 // bits
    shifts = (torch.arange(pack, device=qweight.device) * bits).view(1, pack, 1)
    q = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(qweight.shape[0] * pack, qweight.shape[1])


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """(input, output) 4-bit codes -> AWQ qweight (input, output / 8) int32, columns interleaved."""
    q = q.to(torch.int64).reshape(q.shape[0], q.shape[1] // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = (torch.arange(8, device=q.device) * 4).view(1, 1, 8)
    return _to_int32((q << shifts).sum(dim=2))


def unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight -> (input, output) codes in int32."""
    shifts = (torch.arange(8, device=qweight.device) * 4).view(1, 1, 8)
    nibbles = (qweight.unsqueeze(2) >> shifts) & 0xF  # nibble k = column AWQ_ORDER[k]
    inverse = [AWQ_ORDER.index(c) for c in range(8)]
    return nibbles[:, :, inverse].reshape(qweight.shape[0], qweight.shape[1] * 8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are summed in int64 as unsigned 32-bit values; wrap the top bit into int32's sign.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group of inputs: (output, input) float -> codes (input, output) int32,
    scales and zeros (groups, output), so that ``w[o, i] ~= scales[g, o] * (codes[i, o] - zeros[g, o])``."""
    maxq = (1 << bits) - 1
    out_size, in_size = weight.shape
    w = weight.float().t().reshape(in_size // group_size, group_size, out_size)
    if sym:
        scales = (w.abs().amax(dim=1) * 2 / maxq).clamp_min(1e-10)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(dim=1).clamp_max(0), w.amax(dim=1).clamp_min(0)
        scales = ((hi - lo) / maxq).clamp_min(1e-10)
        zeros = torch.round(-lo / scales).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scales.unsqueeze(1)) + zeros.unsqueeze(1), 0, maxq)
    return codes.reshape(in_size, out_size).to(torch.int32), scales, zeros.to(torch.int32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(input, output) codes with per-group scales/zeros -> the (output, input) float weight."""
    in_size, out_size = codes.shape
    q = codes.reshape(in_size // group_size, group_size, out_size).to(scales.dtype)
    w = (q - zeros.unsqueeze(1).to(scales.dtype)) * scales.unsqueeze(1)
    return w.reshape(in_size, out_size).t()


class PackedIntLinearMethod(QuantizationMethod):
    """``weight``: the packed int32 qweight of ``fmt`` (gptq or awq); ``scales``/``zeros`` buffers per group.

    The float checkpoint slice given to ``weight_loader`` is quantized on arrival, so no dense copy of
    the layer is ever held."""

    def __init__(self, fmt: str, bits: int, group_size: int, sym: bool) -> None:
        self.fmt, self.bits, self.group_size, self.sym = fmt, bits, group_size, sym

    def _group(self, input_size: int) -> int:
        return input_size if self.group_size == -1 else self.group_size

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        group = self._group(input_size)
        pack = 32 // self.bits
        if input_size % group or group % pack:
            raise ValueError(
                f"quantization: group_size {group} must divide the layer's input size {input_size} "
                f"and be a multiple of {pack}"
            )
        if self.fmt == "awq" and output_size % 8:
            raise ValueError(f"quantization: awq needs output sizes divisible by 8, got {output_size}")
        shape = (input_size // pack, output_size) if self.fmt == "gptq" else (input_size, output_size // 8)
        layer.weight = nn.Parameter(torch.zeros(shape, dtype=torch.int32), requires_grad=False)
        layer.weight.weight_loader = weight_loader
        dtype = torch.get_default_dtype()
        # Until loaded: a scale and zero that map random codes (load_format=dummy) to about +-DUMMY_RANGE.
        layer.register_buffer("scales", torch.full((input_size // group, output_size), DUMMY_SCALE, dtype=dtype))
        zero = 1 << (self.bits - 1)
        layer.register_buffer("zeros", torch.full((input_size // group, output_size), zero, dtype=torch.int32))
        if bias:
            layer.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            layer.bias.weight_loader = weight_loader
        else:
            layer.register_parameter("bias", None)

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        offset, size = output_span if output_span is not None else (0, layer.scales.shape[1])
        if param is not layer.weight:  # the bias
            param.data.narrow(0, offset, size).copy_(loaded_weight)
            return
        if loaded_weight.shape != (size, layer.scales.shape[0] * self._group(loaded_weight.shape[1])):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit the layer")
        codes, scales, zeros = quantize_rtn(
            loaded_weight.to(param.device), self.bits, self._group(loaded_weight.shape[1]), self.sym
        )
        layer.scales.narrow(1, offset, size).copy_(scales)
        layer.zeros.narrow(1, offset, size).copy_(zeros)
        if self.fmt == "gptq":
            param.data.narrow(1, offset, size).copy_(pack_gptq(codes, self.bits))
        else:
            if offset % 8 or size % 8:
                raise ValueError(f"quantization: awq shard at {offset} of size {size} is not 8-aligned")
            param.data.narrow(1, offset // 8, size // 8).copy_(pack_awq(codes))

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's (output, input) weight in the scales' dtype."""
        codes = unpack_gptq(layer.weight, self.bits) if self.fmt == "gptq" else unpack_awq(layer.weight)
        return dequantize(codes, layer.scales, layer.zeros, self._group(codes.shape[0]))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(layer).to(x.dtype), bias)


class _PackedIntConfig(QuantizationConfig):
    """Settings shared by gptq and awq: ``bits``, ``group_size`` (-1: one group per row), ``sym``."""

    fmt = "abstract"
    allowed_bits: tuple[int, ...] = (4,)

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True) -> None:
        if bits not in self.allowed_bits:
            raise ValueError(f"quantization: {self.fmt} bits must be one of {self.allowed_bits}, got {bits}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"quantization: {self.fmt} group_size must be positive or -1, got {group_size}")
        self.bits, self.group_size, self.sym = bits, group_size, sym

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return PackedIntLinearMethod(self.fmt, self.bits, self.group_size, self.sym)

    @classmethod
    def check_float_checkpoint(cls, hf_quant_config: dict[str, Any]) -> None:
        """A checkpoint that declares a ``quant_method`` holds packed tensors, which we cannot load yet."""
        if "quant_method" in hf_quant_config:
            raise ValueError(
                f"quantization: loading {hf_quant_config['quant_method']!r} checkpoints (qweight/qzeros/scales) "
                f"is not supported yet; {cls.fmt} quantizes a float checkpoint at load"
            )


class GptqConfig(_PackedIntConfig):
    """GPTQ's layout; ``quantization_config`` keys ``bits``, ``group_size``, ``sym`` as AutoGPTQ writes them."""

    name = fmt = "gptq"
    allowed_bits = (4, 8)

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> GptqConfig:
        cls.check_float_checkpoint(hf_quant_config)
        if hf_quant_config.get("desc_act"):
            raise ValueError("quantization: gptq desc_act (act-order) checkpoints are not supported yet")
        return cls(int(hf_quant_config.get("bits", 4)), int(hf_quant_config.get("group_size", DEFAULT_GROUP_SIZE)),
                   bool(hf_quant_config.get("sym", True)))


class AwqConfig(_PackedIntConfig):
    """AWQ's GEMM layout, zero points always present; keys ``w_bit``/``bits``, ``q_group_size``/``group_size``."""

    name = fmt = "awq"

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> AwqConfig:
        cls.check_float_checkpoint(hf_quant_config)
        bits = hf_quant_config.get("bits", hf_quant_config.get("w_bit", 4))
        group = hf_quant_config.get("group_size", hf_quant_config.get("q_group_size", DEFAULT_GROUP_SIZE))
        return cls(int(bits), int(group), sym=not hf_quant_config.get("zero_point", True))

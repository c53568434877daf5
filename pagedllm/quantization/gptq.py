"""``gptq`` / ``awq`` / ``gguf``: 4-bit (gptq also 8-bit) weights, one scale and zero point per group of inputs.

Three ways in, one layout:

    a GPTQ or AWQ checkpoint   (``quantization_config.quant_method`` gptq/awq; found without a flag)
        its qweight/qzeros/scales(/g_idx) tensors, converted as each shard arrives
    a float checkpoint with ``--quantization gptq|awq``
        each weight quantized at load, round-to-nearest per group (gptq symmetric, awq with zeros)
    a GGUF file with ``--quantization gguf``
        its Q4_0 / Q4_1 / Q4_K blocks' own codes, groups of 32 (``loader/gguf_dequant.int4_parts``:
        x = code * scale + low, kept as zero = -low / scale), scales and zeros in float32 so that the
        weight is the file's dequantization to float32 rounding

Every layer keeps its weight as (the formats themselves: int_packing.py)

    qweight  (K / pack, N) int32   GPTQ's packing along the inputs (AWQ's columns un-interleaved)
    qzeros   (G, N) model dtype     the zero point of each group and column, unpacked: GPTQ v1's stored
                                    ``zero - 1`` gets its +1 back (a stored 15 in 4 bits is 16, as
                                    AutoGPTQ's kernels read it), so one formula serves every format
    scales   (G, N) model dtype
    g_idx    (K,) int32             the group of each input: act-order (``desc_act``) checkpoints permute
                                    them; ``arange(K) // group_size`` otherwise

and ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - qzeros[g_idx[k], n])``. A fused layer (qkv, gate_up)
loads each shard's tensors into its span of output columns. The matmul, on CUDA: Triton
(gptq_triton.py: dequantization inside the GEMM for decode-sized batches, a dequantize kernel and
cuBLAS for larger ones); elsewhere, or without Triton, the weight is dequantized to the activation
dtype by torch ops for one dense GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.loader.gguf_dequant import INT4_CODES
from pagedllm.quantization.base import QuantizationConfig, QuantizationMethod, WeightLoader, register_bias
from pagedllm.quantization.int_packing import (
    dequantize,
    pack_rows,
    quantize_rtn,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)

# Quantizing at load: 64, not GPTQ's usual 128, divides SmolLM2's hidden size 576 (and Llama-3-8B's dims).
DEFAULT_GROUP_SIZE = 64
_CHECKPOINT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class PackedIntLinearMethod(QuantizationMethod):
    """A GPTQ/AWQ layer; see the module docstring for its tensors.

    ``fmt``: the checkpoint's format, "gptq" (``v1``: zeros stored minus one), "awq", "float" (a float
    checkpoint quantized on arrival into the same tensors, through an empty ``weight`` placeholder), or
    "gguf" (the same placeholder, filled from the codes a GGUF's 4-bit tensor carries)."""

    def __init__(self, fmt: str, bits: int, group_size: int, sym: bool, v1: bool = False,
                 act_order: bool = False) -> None:
        self.fmt, self.bits, self.group_size, self.sym, self.v1 = fmt, bits, group_size, sym, v1
        self.act_order = act_order  # the checkpoint declares desc_act: g_idx must come with it
        self.pack = 32 // bits

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        group = input_size if self.group_size == -1 else self.group_size
        if input_size % group or input_size % self.pack:
            raise ValueError(f"quantization: group_size {group} must divide the layer's input size {input_size}, "
                             f"a multiple of {self.pack}")
        if output_size % self.pack:
            raise ValueError(f"quantization: {self.bits}-bit layers need output sizes divisible by {self.pack}, "
                             f"got {output_size}")
        groups = input_size // group
        if self._keeps_every_group(layer):  # act-order scatters a group's inputs over the ranks
            groups *= layer.tp_size
        # GGUF: float32 scales and zeros (zero = -low / scale), so the weight is the file's to fp32 rounding.
        dtype = torch.float32 if self.fmt == "gguf" else torch.get_default_dtype()

        def param(data: torch.Tensor, from_checkpoint: bool) -> nn.Parameter:
            p = nn.Parameter(data, requires_grad=False)
            p.weight_loader = weight_loader
            p.derived_from_weight = not from_checkpoint  # filled by another tensor's loader
            return p

        packed = self.fmt not in ("float", "gguf")
        layer.qweight = param(torch.zeros(input_size // self.pack, output_size, dtype=torch.int32), packed)
        layer.qzeros = param(torch.zeros(groups, output_size, dtype=dtype), packed)
        layer.scales = param(torch.zeros(groups, output_size, dtype=dtype), packed)
        g_idx = torch.arange(input_size, dtype=torch.int32) // group
        layer.g_idx = param(g_idx, self.fmt == "gptq" and self.act_order)  # optional unless desc_act
        layer.group_size = group
        layer.act_order = False  # a g_idx out of input order turns it on as it loads
        if not packed:
            layer.weight = param(torch.empty(0, dtype=dtype), True)
        register_bias(layer, output_size, bias, weight_loader)

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        offset, size = output_span if output_span is not None else (0, layer.scales.shape[1])
        if param is layer.bias:
            _copy(param.data.narrow(0, offset, size), loaded_weight, "bias")
        elif param is getattr(layer, "weight", None) and self.fmt == "gguf":
            self._load_gguf_codes(layer, loaded_weight, offset, size)
        elif param is getattr(layer, "weight", None):
            self._quantize_float(layer, loaded_weight.to(param.device), offset, size)
        elif param is layer.g_idx:
            self._load_g_idx(layer, loaded_weight.to(param.device))
        else:
            name = next(n for n in _CHECKPOINT_TENSORS if getattr(layer, n) is param)
            value = self._convert(name, loaded_weight.to(param.device))
            _copy(param.data.narrow(1, offset, size), value, name)

    def shard(self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
              out_span: tuple[int, int] | None = None, in_span: tuple[int, int] | None = None) -> torch.Tensor:
        """A rank's part of a checkpoint tensor in the formats' layouts: outputs are columns (packed ``pack``
        to a word in AWQ's qweight and both formats' qzeros), inputs are rows (packed in GPTQ's qweight),
        and a row-parallel rank takes the groups of its inputs (all of them with one group per row, or with
        act-order, where any input may be in any group)."""
        if param is layer.bias or param is getattr(layer, "weight", None):
            return super().shard(layer, param, loaded_weight, out_span, in_span)
        name = next(n for n in _CHECKPOINT_TENSORS if getattr(layer, n) is param)
        t = loaded_weight
        if out_span is not None and name != "g_idx":
            start, size = out_span
            if name == "qzeros" or (name == "qweight" and self.fmt == "awq"):
                if start % self.pack or size % self.pack:
                    raise ValueError(f"{name}: this rank's outputs [{start}, {start + size}) do not fall on whole "
                                     f"{self.bits}-bit words of {self.pack} (tensor_parallel_size too large?)")
                start, size = start // self.pack, size // self.pack
            t = t.narrow(1, start, size)
        if in_span is not None:
            start, size = in_span
            every_group = self.group_size == -1 or self._keeps_every_group(layer)
            if name == "qweight":
                rows = (start // self.pack, size // self.pack) if self.fmt == "gptq" else (start, size)
                t = t.narrow(0, *rows)
            elif name == "g_idx":  # the groups of this rank's inputs (counted from its first, unless all kept)
                t = t.narrow(0, start, size) - (0 if every_group else start // self.group_size)
            elif not every_group:
                t = t.narrow(0, start // self.group_size, size // self.group_size)
        return t

    def _keeps_every_group(self, layer: nn.Module) -> bool:
        """A row-parallel rank of an act-order checkpoint: its inputs belong to any group, so it keeps them all."""
        return (getattr(layer, "tp_size", 1) > 1 and layer.tp_dim == 1 and self.act_order
                and self.group_size != -1)

    def _convert(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor of one shard -> our layout (see the module docstring)."""
        if name == "scales":
            return t
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (packed codes), got {t.dtype}")
        if self.fmt == "awq":
            codes = unpack_awq(t)
            return pack_rows(codes, self.bits) if name == "qweight" else codes
        if name == "qweight":
            return t
        return unpack_cols(t, self.bits) + (1 if self.v1 else 0)

    def _load_g_idx(self, layer: nn.Module, g_idx: torch.Tensor) -> None:
        # Fused shards (q, k, v) share their input, so GPTQ gives them the same act-order permutation.
        if getattr(layer, "_g_idx_loaded", False) and not torch.equal(layer.g_idx.to(g_idx), g_idx):
            raise ValueError("g_idx differs between the shards of a fused layer (not supported)")
        _copy(layer.g_idx.data, g_idx, "g_idx")
        groups = layer.scales.shape[0]
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"g_idx holds groups outside 0..{groups - 1}")
        in_order = torch.arange(g_idx.numel(), device=g_idx.device) // layer.group_size
        layer.act_order = not torch.equal(g_idx.long(), in_order)
        layer._g_idx_loaded = True

    def _quantize_float(self, layer: nn.Module, weight: torch.Tensor, offset: int, size: int) -> None:
        in_size = layer.g_idx.numel()
        if weight.shape != (size, in_size):
            raise ValueError(f"checkpoint tensor of shape {tuple(weight.shape)} does not fit {(size, in_size)}")
        if not weight.is_floating_point():
            raise ValueError(f"a {weight.dtype} weight cannot be quantized at load (a float checkpoint is needed)")
        codes, scales, zeros = quantize_rtn(weight, self.bits, layer.group_size, self.sym)
        layer.qweight.data.narrow(1, offset, size).copy_(pack_rows(codes, self.bits))
        layer.scales.data.narrow(1, offset, size).copy_(scales)
        layer.qzeros.data.narrow(1, offset, size).copy_(zeros)

    def _load_gguf_codes(self, layer: nn.Module, weight: torch.Tensor, offset: int, size: int) -> None:
        """A GGUF matrix's codes into the packed layout: x = code * scale + low = (code - zero) * scale with
        zero = -low / scale. A block whose scale is 0 holds ``low`` everywhere: its codes become 0 and its
        scale 1 (exact: llama.cpp writes such blocks with code 0 anyway)."""
        parts = getattr(weight, INT4_CODES, None)
        in_size = layer.g_idx.numel()
        if parts is None:
            raise ValueError("quantization gguf: a linear layer's tensor has no 4-bit codes (GGUF Q4_0, Q4_1 or "
                             "Q4_K needed; other types load without --quantization gguf)")
        codes, scale, low = (t.to(layer.qweight.device) for t in parts)
        if codes.shape != (size, in_size):
            raise ValueError(f"GGUF tensor of shape {tuple(codes.shape)} does not fit {(size, in_size)}")
        flat = scale == 0
        if bool(flat.any()):
            codes = codes.view(size, -1, 32).masked_fill(flat[..., None], 0).view(size, in_size)
            scale = torch.where(flat, torch.ones_like(scale), scale)
        layer.qweight.data.narrow(1, offset, size).copy_(pack_rows(codes.T.to(torch.int32), self.bits))
        layer.scales.data.narrow(1, offset, size).copy_(scale.T)
        layer.qzeros.data.narrow(1, offset, size).copy_((-low / scale).T)

    @torch.no_grad()
    def init_dummy(self, layer: nn.Module, generator: torch.Generator, bound: float) -> None:
        """Random codes around the middle zero, scaled so that weights land in +-bound."""
        half = 1 << (self.bits - 1)
        k, n = layer.g_idx.numel(), layer.scales.shape[1]
        codes = torch.randint(0, 2 * half, (k, n), generator=generator, device=layer.qweight.device)
        layer.qweight.data.copy_(pack_rows(codes, self.bits))
        layer.qzeros.data.fill_(half)
        layer.scales.data.fill_(bound / half)
        if layer.bias is not None:
            layer.bias.data.uniform_(-bound, bound, generator=generator)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's (output, input) weight in the scales' dtype."""
        return dequantize(unpack_rows(layer.qweight, self.bits), layer.scales, layer.qzeros, layer.g_idx)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda and _has_triton():
            from pagedllm.quantization.gptq_triton import gptq_matmul

            x2 = x.reshape(-1, x.shape[-1])
            y = gptq_matmul(x2, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, self.bits,
                            layer.group_size, layer.act_order)
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized_weight(layer).to(x.dtype), bias)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name} of shape {tuple(src.shape)} does not fit the layer's {tuple(dst.shape)} "
                         "(bits or group_size differ from quantization_config?)")
    dst.copy_(src)


_TRITON: bool | None = None


def _has_triton() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


class _PackedIntConfig(QuantizationConfig):
    """Settings shared by gptq and awq: ``bits``, ``group_size`` (-1: one group per row), ``sym``, and
    ``fmt``: the checkpoint's format ("float" when quantizing at load)."""

    name = "abstract"
    allowed_bits: tuple[int, ...] = (4,)

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True, fmt: str = "float",
                 v1: bool = False, act_order: bool = False) -> None:
        if bits not in self.allowed_bits:
            raise ValueError(f"quantization_config: {self.name} bits must be one of {self.allowed_bits}, got {bits}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"quantization_config: {self.name} group_size must be positive or -1, got {group_size}")
        self.bits, self.group_size, self.sym, self.fmt, self.v1 = bits, group_size, sym, fmt, v1
        self.act_order = act_order

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return PackedIntLinearMethod(self.fmt, self.bits, self.group_size, self.sym, self.v1, self.act_order)

    @classmethod
    def _checkpoint_method(cls, hf_quant_config: dict[str, Any]) -> str | None:
        """The checkpoint's quant_method: None for a float checkpoint, else it must be ours."""
        method = hf_quant_config.get("quant_method")
        if method is not None and method != cls.name:
            raise ValueError(f"quantization={cls.name} cannot load a checkpoint whose quant_method is {method!r}")
        for key in ("modules_to_not_convert", "dynamic"):
            if hf_quant_config.get(key):
                raise ValueError(f"quantization_config: {key} (layers quantized differently) is not supported yet")
        if hf_quant_config.get("lm_head"):
            raise ValueError("quantization_config: lm_head true (a quantized LM head) is not supported yet")
        return method


class GptqConfig(_PackedIntConfig):
    """GPTQ: ``bits`` 4/8, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` gptq (v1) or gptq_v2."""

    name = "gptq"
    allowed_bits = (4, 8)

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> GptqConfig:
        method = cls._checkpoint_method(hf_quant_config)
        sym = bool(hf_quant_config.get("sym", True))
        if method is None:
            return cls(int(hf_quant_config.get("bits", 4)), int(hf_quant_config.get("group_size", DEFAULT_GROUP_SIZE)),
                       sym)
        fmt = hf_quant_config.get("checkpoint_format", hf_quant_config.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config: checkpoint_format {fmt!r} is not supported; gptq and gptq_v2 are")
        if hf_quant_config.get("is_marlin_format"):
            raise ValueError("quantization_config: is_marlin_format checkpoints are not supported")
        if hf_quant_config.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise ValueError(f"quantization_config: pack_dtype {hf_quant_config['pack_dtype']!r} is not supported; "
                             "int32 is")
        return cls(int(hf_quant_config.get("bits", 4)), int(hf_quant_config.get("group_size", 128)), sym,
                   fmt="gptq", v1=fmt == "gptq", act_order=bool(hf_quant_config.get("desc_act", False)))


class AwqConfig(_PackedIntConfig):
    """AWQ's GEMM layout, zero points always present; keys ``bits``/``w_bit``, ``group_size``/``q_group_size``,
    ``zero_point`` (true), ``version`` gemm."""

    name = "awq"

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> AwqConfig:
        method = cls._checkpoint_method(hf_quant_config)
        bits = hf_quant_config.get("bits", hf_quant_config.get("w_bit", 4))
        default_group = DEFAULT_GROUP_SIZE if method is None else 128
        group = hf_quant_config.get("group_size", hf_quant_config.get("q_group_size", default_group))
        if method is None:
            return cls(int(bits), int(group), sym=False)
        version = str(hf_quant_config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config: awq version {version!r} is not supported; gemm is")
        if not hf_quant_config.get("zero_point", True):
            raise ValueError("quantization_config: awq zero_point false is not supported; zero points are needed")
        return cls(int(bits), int(group), sym=False, fmt="awq")


class GgufConfig(_PackedIntConfig):
    """A GGUF file's 4-bit linear layers (Q4_0, Q4_1, Q4_K) kept as their codes: groups of 32 inputs, float32
    scales and zeros; the Triton kernels of gptq/awq multiply them on CUDA. ``--quantization gguf``."""

    name = "gguf"
    needs_int4_codes = True

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> GgufConfig:
        if hf_quant_config.get("quant_method"):
            raise ValueError(f"quantization gguf loads GGUF files; this checkpoint is "
                             f"{hf_quant_config['quant_method']!r}")
        return cls(4, 32, sym=False, fmt="gguf")

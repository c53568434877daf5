"""Quantization: how linear layers store and multiply their weights.

``ModelConfig.quantization`` names a method; ``get_quantization_config`` turns
the name into a ``QuantizationConfig`` (base.py), which gives each linear layer
its ``QuantizationMethod`` (``create_weights``, ``weight_loader``, ``apply``).
``None`` means dense weights: every layer gets ``UnquantizedLinearMethod``.

The registry maps a name to "module:Class" and imports it on first use, so
naming a method costs nothing until a model is built with it, and this package
imports no torch (``EngineArgs`` validates names against it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.quantization.base import QuantizationConfig

# Method name -> "module:QuantizationConfig subclass"; dense weights (quantization=None) need no entry.
QUANTIZATION_METHODS: dict[str, str] = {
    "cpu_bf16": "pagedllm.quantization.cpu_bf16:CpuBf16Config",  # bf16 weights, fp32 activations (CPU default)
    "fp8": "pagedllm.quantization.w8a8:Fp8Config",  # W8A8 fp8 e4m3, per-channel weights, per-token activations
    "int8": "pagedllm.quantization.w8a8:Int8Config",  # W8A8 int8 on CUDA, int8 weight-only on the CPU
    "compressed-tensors": "pagedllm.quantization.w8a8:W8A8Config",  # 8-bit float/int checkpoints of llm-compressor
    "gptq": "pagedllm.quantization.gptq:GptqConfig",  # GPTQ checkpoints (4/8-bit), or 4-bit RTN at load
    "awq": "pagedllm.quantization.gptq:AwqConfig",  # AWQ (GEMM) checkpoints, or 4-bit RTN at load
    "gguf": "pagedllm.quantization.gptq:GgufConfig",  # a GGUF's Q4_0/Q4_1/Q4_K matrices kept as their codes
}

# A checkpoint's quantization_config["quant_method"] -> the method that loads it.
CHECKPOINT_METHODS: dict[str, str] = {"fp8": "fp8", "compressed-tensors": "compressed-tensors", "gptq": "gptq",
                                      "awq": "awq"}


def checkpoint_quantization(requested: str | None, hf_quant_config: dict[str, Any] | None) -> str | None:
    """The method for a model: the checkpoint's own format when it has one (a quantized checkpoint
    loads only with its method; the CPU's default ``cpu_bf16`` gives way to it), else ``requested``."""
    if not hf_quant_config:
        return requested
    method = hf_quant_config.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"quantization_config: quant_method {method!r} is not supported; "
                         f"supported: {', '.join(sorted(CHECKPOINT_METHODS))}")
    if requested in (None, "cpu_bf16"):
        return CHECKPOINT_METHODS[method]
    return requested


def check_quantization(name: str | None) -> None:
    """Raise ValueError unless ``name`` is None (dense) or a registered method."""
    if name is not None and name not in QUANTIZATION_METHODS:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet (only None: dense weights)"
        raise ValueError(f"quantization: unknown method {name!r}; supported: {supported}")


def get_quantization_config(
    name: str | None, hf_quant_config: dict[str, Any] | None = None
) -> QuantizationConfig | None:
    """The config of method ``name`` (built from the checkpoint's ``quantization_config``), None for dense."""
    check_quantization(name)
    if name is None:
        return None
    module_name, _, class_name = QUANTIZATION_METHODS[name].partition(":")
    config_cls = getattr(importlib.import_module(module_name), class_name)
    return config_cls.from_config(hf_quant_config or {})

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
}


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

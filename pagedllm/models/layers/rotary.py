"""Rotary position embedding (RoPE), neox style as HF Llama applies it.

The head dimension is split in two halves (x1, x2) rotated by the same angle
``position * inv_freq[i]``:  (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
cos/sin are computed once for every position up to ``max_position`` and looked
up by position, so a ragged batch needs no per-sequence work; a forward looks up
its step's rows once (``tables``) and every layer applies them (``apply``).

Frequency schedules (``rope_type``): "default", "linear" (positions divided by
``factor``) and "llama3" (long wavelengths divided by ``factor``, short ones
kept, a smooth blend between), matching transformers' ``modeling_rope_utils``.

On CUDA, ``kernels.select_kernels`` swaps in one fused Triton kernel rotating q and
k in place (fused_ops.py), once, when the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pagedllm.models.layers.kernels import load_fused_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# RotaryEmbedding.tables: the positions (fused kernel) or (cos, sin) each (T, 1, head_dim).
RopeTables = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def rope_parameters(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, scaling)`` from a HF config; transformers 5 ``rope_parameters`` or 4.x fields.

    ``scaling`` always has a "rope_type" key ("default" when the model is not scaled).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params:  # transformers >= 5: one dict holding rope_theta and the scaling settings
        scaling = dict(params)
        theta = scaling.pop("rope_theta", None)
    else:  # transformers 4.x: rope_theta next to an optional rope_scaling dict
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
        theta = None
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None) or 10000.0
    # 4.x configs spell the key "type" in older checkpoints.
    scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", None)) or "default"
    return float(theta), scaling


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any], max_position: int) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32 for one of SUPPORTED_ROPE_TYPES."""
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
    # Same expression as transformers, so cos/sin match it bit for bit in fp32.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling, max_position)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any], max_position: int) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling.get("original_max_position_embeddings") or max_position
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones are left alone ...
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # ... and the band between the two cut-offs blends the two smoothly.
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's position."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, theta, scaling, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())  # (max_position, head_dim // 2)
        # Kept in fp32 whatever the model dtype; cast at use, as HF does.
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
        self._fused: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def use_fused_kernels(self, enabled: bool) -> None:
        """Rotate q and k in place with one Triton kernel instead of torch; set once, at model build."""
        self._fused = load_fused_ops().rotary_embedding_ if enabled else None

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """What ``apply`` needs for a step's ``positions`` (T,), worked out once for all layers: the
        positions themselves for the fused kernel, else (cos, sin) each (T, 1, head_dim) in ``dtype``,
        laid out so that a rotation is ``x * cos + swap_halves(x) * sin`` (sin's first half negated)."""
        if self._fused is not None:
            return positions
        cos = self.cos_cache[positions].unsqueeze(1).to(dtype)  # (T, 1, head_dim // 2)
        sin = self.sin_cache[positions].unsqueeze(1).to(dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def apply(
        self,
        tables: RopeTables,  # from ``tables``
        query: torch.Tensor,  # (T, num_heads, head_dim)
        key: torch.Tensor,  # (T, num_kv_heads, head_dim)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fused is not None:  # in place, one kernel for q and k
            return self._fused(tables, query, key, self.cos_cache, self.sin_cache)
        return rotate(query, tables), rotate(key, tables)

    @property
    def in_place(self) -> bool:
        """True when ``apply`` is the fused kernel (its tables are positions, not cos/sin)."""
        return self._fused is not None

    def forward(
        self,
        positions: torch.Tensor,  # (T,) int64
        query: torch.Tensor,  # (T, num_heads, head_dim)
        key: torch.Tensor,  # (T, num_kv_heads, head_dim)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(self.tables(positions, query.dtype), query, key)


def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over any (T, heads, head_dim) ``x``: HF's
    ``x * cos + rotate_half(x) * sin``, the same float operations in the same order."""
    cos, sin = tables
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin

"""Load and validate a PEFT LoRA adapter directory.

PEFT stores, per adapted linear, `lora_A` (rank, in) and `lora_B` (out, rank) under keys
like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. The delta applied to
`y = x W^T` is `scaling * (x A^T) B^T` with `scaling = alpha / r` (or `alpha / sqrt(r)` with
rsLoRA). We fold `scaling` into B once at load so the batched kernels need no per-slot scale.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter's weights in fp32, scaling folded into B.

    `weights[(layer, target)] = (A, B)` with A: (rank, in), B: (out, rank).
    """

    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_adapter_config(path: str, max_rank: int) -> tuple[int, float, set[str]]:
    """Validate `adapter_config.json`; returns (rank, scaling, target modules)."""
    if not os.path.isdir(path):
        raise ValueError(f"lora_path: {path!r} is not a directory")
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"lora_path: no adapter_config.json in {path!r}")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"lora_path: peft_type {cfg.get('peft_type')!r} is not LORA")
    rank = int(cfg.get("r", 0))
    if rank < 1 or rank > max_rank:
        raise ValueError(f"lora rank {rank} of {path!r} is outside 1..max_lora_rank={max_rank}")
    targets = cfg.get("target_modules") or []
    targets = {targets} if isinstance(targets, str) else set(targets)
    unsupported = targets - set(SUPPORTED_TARGETS)
    if unsupported:
        raise ValueError(f"target_modules {sorted(unsupported)} not supported (supported: {SUPPORTED_TARGETS})")
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"),
                      ("alpha_pattern", "per-module alphas"), ("modules_to_save", "modules_to_save"),
                      ("lora_bias", "LoRA biases")):
        if cfg.get(key):
            raise ValueError(f"adapter {path!r}: {key} ({what}) is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter {path!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return rank, scaling, targets


def _tensor_keys(path: str, max_rank: int) -> tuple[int, float, str, dict[tuple[int, str], dict[str, str]]]:
    """(rank, scaling, safetensors file, {(layer, target): {"A": key, "B": key}}), checked for completeness."""
    rank, scaling, _ = read_adapter_config(path, max_rank)
    st_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(st_path):
        raise ValueError(f"lora_path: no adapter_model.safetensors in {path!r}")
    from safetensors import safe_open

    halves: dict[tuple[int, str], dict[str, str]] = {}
    with safe_open(st_path, framework="pt") as f:
        for key in f.keys():
            m = _KEY_RE.search(key)
            if m is None or m.group(2) not in SUPPORTED_TARGETS:
                raise ValueError(f"adapter tensor {key!r} is not a supported LoRA weight")
            halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = key
    for slot, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {path!r}: layer {slot} lacks lora_A or lora_B")
    return rank, scaling, st_path, halves


def adapter_shapes(path: str, max_rank: int) -> dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each (layer, target)'s (A shape, B shape), read from the file's header only (no weights loaded)."""
    from safetensors import safe_open

    rank, _, st_path, halves = _tensor_keys(path, max_rank)
    shapes = {}
    with safe_open(st_path, framework="pt") as f:
        for slot, ab in halves.items():
            a, b = (tuple(f.get_slice(ab[h]).get_shape()) for h in ("A", "B"))
            if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
                raise ValueError(f"adapter {path!r}: {slot} shapes {a}/{b} disagree with r={rank}")
            shapes[slot] = (a, b)
    return shapes


def load_peft_adapter(path: str, max_rank: int) -> LoRAAdapter:
    """Read a PEFT adapter directory into a `LoRAAdapter`; ValueError on anything we cannot serve."""
    from safetensors import safe_open

    shapes = adapter_shapes(path, max_rank)
    rank, scaling, st_path, halves = _tensor_keys(path, max_rank)
    adapter = LoRAAdapter(rank=rank, scaling=scaling)
    with safe_open(st_path, framework="pt") as f:
        for slot in sorted(shapes):
            a, b = (f.get_tensor(halves[slot][h]).float() for h in ("A", "B"))
            adapter.weights[slot] = (a.contiguous(), (b * scaling).contiguous())
    return adapter


def check_adapter(shapes: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]],
                  model_shapes: dict[str, tuple[int, int]], num_layers: int, path: str) -> None:
    """ValueError unless every weight (``adapter_shapes``) fits the model: ``model_shapes`` are each
    target's (in, out) (``layers.target_shapes``) and layers run ``0 .. num_layers - 1``."""
    for (layer, target), (a, b) in shapes.items():
        if not 0 <= layer < num_layers:
            raise ValueError(f"adapter {path!r}: layer {layer} is outside the model's {num_layers} layers")
        want_in, want_out = model_shapes[target]
        if a[1] != want_in or b[0] != want_out:
            raise ValueError(f"adapter {path!r}: {target} of layer {layer} is {b[0]}x{a[1]}, "
                             f"the model's is {want_out}x{want_in} (an adapter for another model?)")

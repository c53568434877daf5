"""Random LoRA adapters in the PEFT format, for benchmarks and tests (``--load-format dummy``'s twin).

The files are what ``peft`` saves (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight``), written
without needing peft. A ~ N(0, 1/in) as PEFT's Kaiming init draws it; B ~ N(0, b_std), since a
trained adapter's B is nonzero.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from pagedllm.lora.adapter import SUPPORTED_TARGETS


def write_random_adapter(path: str, hf_config: Any, rank: int, targets: list[str] | tuple[str, ...] = SUPPORTED_TARGETS,
                         seed: int = 0, alpha: float | None = None, b_std: float = 0.02,
                         dtype: torch.dtype = torch.bfloat16) -> str:
    """A rank-``rank`` adapter of ``hf_config``'s model on ``targets`` at ``path``; returns ``path``."""
    from safetensors.torch import save_file

    from pagedllm.lora.layers import target_shapes

    shapes = target_shapes(hf_config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for target in targets:
            d_in, d_out = shapes[target]
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * b_std).to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": list(targets), "bias": "none", "use_rslora": False}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path

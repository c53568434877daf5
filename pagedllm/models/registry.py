"""Which class implements which HF architecture, and the KV-cache geometry of a config.

The engine asks two questions of a HF config before it loads anything:
``get_model_class`` (what to build) and ``kv_cache_shape_info`` (how big one
token's K/V is), so the worker can size the cache without a model instance.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.models.layers.parallel import divide
from pagedllm.models.llama import LlamaForCausalLM, get_head_dim

# HF `architectures` entry -> implementation. The Llama family shares one class,
# which reads its variations (biases, q/k norm) from the config.
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}

# Configs built from GGUF metadata carry a model_type but no `architectures`.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def architecture_of(hf_config: Any) -> str:
    """The config's first `architectures` entry, or the one implied by its model_type."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    return _MODEL_TYPE_TO_ARCH.get(model_type, f"<model_type {model_type!r}>")


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class implementing this config's architecture; ValueError when there is none."""
    arch = architecture_of(hf_config)
    if arch not in _MODELS:
        raise ValueError(
            f"architecture {arch} is not supported; supported architectures: {', '.join(supported_architectures())}"
        )
    return _MODELS[arch]


def kv_cache_shape_info(hf_config: Any, tp_size: int = 1) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of one tensor-parallel rank: each of ``tp_size``
    ranks caches the K/V of its own ``num_kv_heads / tp_size`` heads (QKVParallelLinear's split)."""
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return hf_config.num_hidden_layers, divide(num_kv_heads, tp_size, "num_key_value_heads"), get_head_dim(hf_config)

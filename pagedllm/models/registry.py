"""Which class implements which HF architecture, and the KV-cache geometry of a config.

The engine asks two questions of a HF config before it loads anything:
``get_model_class`` (what to build) and ``kv_cache_shape_info`` (how big one
token's K/V is), so the worker can size the cache without a model instance.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.models.architectures import architecture_of
from pagedllm.models.layers.parallel import divide, kv_heads_per_rank, pp_layer_range
from pagedllm.models.llama import LlamaForCausalLM, get_head_dim

# HF `architectures` entry -> implementation. The Llama family shares one class,
# which reads its variations (biases, q/k norm) from the config.
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class implementing this config's architecture; ValueError when there is none."""
    arch = architecture_of(hf_config)
    if arch not in _MODELS:
        raise ValueError(
            f"architecture {arch} is not supported; supported architectures: {', '.join(supported_architectures())}"
        )
    return _MODELS[arch]


def kv_cache_shape_info(hf_config: Any, tp_size: int = 1, pp_rank: int = 0,
                        pp_size: int = 1) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of one rank: the layers of its pipeline stage, and the
    K/V heads of its tensor-parallel share (QKVParallelLinear's split: ``num_kv_heads / tp_size``, or
    one replicated head when there are more ranks than KV heads)."""
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    start, end = pp_layer_range(hf_config.num_hidden_layers, pp_rank, pp_size)
    return end - start, kv_heads_per_rank(num_kv_heads, tp_size), get_head_dim(hf_config)


def check_parallel_shapes(hf_config: Any, tp_size: int, pp_size: int) -> None:
    """A ValueError naming the config field that does not split over ``tp_size`` ranks (attention heads,
    KV heads, the MLP width) or ``pp_size`` stages (layers), before any worker starts."""
    if tp_size * pp_size == 1:
        return
    get_model_class(hf_config)  # an unsupported architecture says so first
    divide(hf_config.num_attention_heads, tp_size, "num_attention_heads")
    divide(hf_config.intermediate_size, tp_size, "intermediate_size")
    kv_heads_per_rank(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads, tp_size)
    pp_layer_range(hf_config.num_hidden_layers, 0, pp_size)

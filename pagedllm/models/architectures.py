"""HF architecture names, torch-free: the API front end resolves a model's config without importing torch."""

from __future__ import annotations

from typing import Any

# Configs built from GGUF metadata carry a model_type but no `architectures`.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def architecture_of(hf_config: Any) -> str:
    """The config's first `architectures` entry, or the one implied by its model_type."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    return _MODEL_TYPE_TO_ARCH.get(model_type, f"<model_type {model_type!r}>")

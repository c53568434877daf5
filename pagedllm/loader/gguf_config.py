"""The HF config of a GGUF checkpoint, from its metadata; torch-free (the API front end resolves it too).

Built from our one read of the metadata (``gguf_reader.read_gguf``) with the
renames transformers' GGUF integration makes, plus what it leaves out:
``head_dim`` from ``{arch}.attention.key_length`` and Llama 3 rope scaling,
which llama.cpp stores as a ``rope_freqs`` tensor, not as metadata (checked
against our rotary code, which imports torch only for such a file).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pagedllm.loader.gguf_reader import read_gguf

# Llama 3's rope scaling as every released 3.x checkpoint sets it; only `factor` varies.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# GGUF architecture -> transformers model_type, for the architectures pagedllm implements.
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# `{arch}.<key>` metadata -> HF config field (the same renames transformers' GGUF integration makes).
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size", "attention.key_length": "head_dim",
}
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                  "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}


def gguf_hf_config(path: str) -> Any:
    """A transformers config for the model in the GGUF file at ``path``, from our one read of its metadata."""
    from transformers import AutoConfig

    gguf_file = read_gguf(path)
    metadata = gguf_file.metadata
    arch = metadata.get("general.architecture")
    name = str(metadata.get("general.name", ""))
    model_type = "mistral" if arch == "llama" and "mistral" in name.lower() else _MODEL_TYPES.get(arch)
    if model_type is None:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(_MODEL_TYPES))}")
    fields: dict[str, Any] = {"_name_or_path": gguf_file.path}
    for key, hf_key in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in metadata:
            fields[hf_key] = metadata[f"{arch}.{key}"]
    for key, hf_key in _TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            fields[hf_key] = metadata[f"tokenizer.ggml.{key}"]
    if "vocab_size" not in fields and "tokenizer.ggml.tokens" in metadata:
        fields["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    # No separate output matrix in the file: the LM head reuses the embedding.
    fields["tie_word_embeddings"] = gguf_file.tensor("output.weight") is None
    hf_config = AutoConfig.for_model(model_type, **fields)
    rope_freqs = gguf_file.tensor("rope_freqs.weight")
    if rope_freqs is not None:
        freqs = np.array(rope_freqs.data.view(np.float32).reshape(-1), dtype=np.float32)
        _set_rope_scaling(hf_config, _llama3_scaling(hf_config, freqs))
    return hf_config


def _llama3_scaling(hf_config: Any, rope_freqs: np.ndarray) -> dict[str, Any]:
    """Recover Llama 3 rope scaling from llama.cpp's per-frequency divisors, or fail clearly."""
    import torch  # only for a file with rope_freqs (Llama 3): the check runs our rotary code

    from pagedllm.models.layers.rotary import compute_inv_freq, rope_parameters

    theta, _ = rope_parameters(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    scaling = dict(_LLAMA3_ROPE, factor=float(rope_freqs.max()))
    max_pos = hf_config.max_position_embeddings
    plain = compute_inv_freq(head_dim, theta, {"rope_type": "default"}, max_pos)
    scaled = compute_inv_freq(head_dim, theta, scaling, max_pos)
    if rope_freqs.shape != plain.shape or not torch.allclose(plain / scaled, torch.from_numpy(rope_freqs), rtol=1e-3):
        raise ValueError("GGUF rope_freqs tensor does not match Llama 3 rope scaling; this scaling is not supported")
    return scaling


def _set_rope_scaling(hf_config: Any, scaling: dict[str, Any]) -> None:
    if getattr(hf_config, "rope_parameters", None) is not None:  # transformers >= 5
        hf_config.rope_parameters = {**hf_config.rope_parameters, **scaling}
    else:
        hf_config.rope_scaling = scaling

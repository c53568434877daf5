"""GGUF checkpoints (llama.cpp's format): HF config from metadata, HF-named dequantized tensors.

- Config: built from our one read of the metadata (``gguf_reader.read_gguf``)
  with the renames transformers' GGUF integration makes, plus what it leaves
  out: ``head_dim`` from ``{arch}.attention.key_length`` and Llama 3 rope
  scaling, which llama.cpp stores as a ``rope_freqs`` tensor, not as metadata.
- Tensors: every type the ``gguf`` package can dequantize (F32, F16, BF16,
  Q4_0 ... Q8_0, K-quants, IQ-quants) is expanded to float32; a type it cannot
  (e.g. Q8_1) is a ValueError naming it, raised before any weight is loaded.
  Names are mapped to HF's with gguf's own ``TensorNameMap``.
- llama.cpp permutes the rows of Q and K for the "llama" architecture (its
  RoPE pairs adjacent dims, HF's pairs the two halves); we undo it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pagedllm.loader.gguf_dequant import dequantize
from pagedllm.loader.gguf_reader import read_gguf
from pagedllm.models.layers.rotary import compute_inv_freq, rope_parameters

logger = logging.getLogger(__name__)

# Architectures whose Q/K rows convert_hf_to_gguf.py permutes.
_PERMUTED_ARCHS = ("llama",)
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


def check_quant_types(path: str) -> None:
    """Raise ValueError naming the first tensor type the gguf package cannot dequantize."""
    from gguf import dequantize

    seen = set()
    for tensor in read_gguf(path).tensors:
        if tensor.tensor_type in seen:
            continue
        try:
            dequantize(tensor.data[:1], tensor.tensor_type)  # one row is enough to probe
        except NotImplementedError:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the installed gguf "
                "package cannot dequantize; re-quantize the model to a supported type (e.g. Q8_0, Q4_K)"
            ) from None
        seen.add(tensor.tensor_type)


def count_gguf_tensors(path: str) -> int:
    return len(read_gguf(path).tensors)


def iter_gguf_weights(path: str, hf_config: Any, hf_names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for each GGUF tensor whose HF name is in ``hf_names``."""
    check_quant_types(path)
    gguf_file = read_gguf(path)
    arch = gguf_file.metadata["general.architecture"]
    to_hf = _gguf_to_hf_names(arch, hf_config.num_hidden_layers, hf_names)
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    for tensor in gguf_file.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            if tensor.name != "rope_freqs.weight":  # already folded into the config
                logger.warning("GGUF tensor %s has no counterpart in the model; skipped", tensor.name)
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        weights = weights.reshape(tensor.shape)
        if arch in _PERMUTED_ARCHS and ".attn_q." in tensor.name:
            weights = _unpermute_rows(weights, num_heads)
        elif arch in _PERMUTED_ARCHS and ".attn_k." in tensor.name:
            weights = _unpermute_rows(weights, num_kv_heads)
        if not weights.flags.writeable:  # F32 tensors are views of the read-only memory map
            weights = weights.copy()
        yield hf_name, torch.from_numpy(weights)


def _gguf_to_hf_names(arch: str, num_layers: int, hf_names: Iterable[str]) -> dict[str, str]:
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_enum = next((a for a, name in MODEL_ARCH_NAMES.items() if name == arch), None)
    if arch_enum is None:
        raise ValueError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    name_map = get_tensor_name_map(arch_enum, num_layers)
    mapping = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")  # "...q_proj" + "weight" / "bias"
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            mapping[f"{gguf_base}.{suffix}"] = hf_name
    return mapping


def _unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's permute(): per head, rows (pair, half) -> (half, pair)."""
    rows = weights.shape[0]
    w = weights.reshape(num_heads, rows // num_heads // 2, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)

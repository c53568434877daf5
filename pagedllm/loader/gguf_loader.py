"""GGUF checkpoints (llama.cpp's format): HF-named dequantized tensors (the config: ``gguf_config``).

- Tensors: every type the ``gguf`` package can dequantize (F32, F16, BF16,
  Q4_0 ... Q8_0, K-quants, IQ-quants) is expanded to float32; a type it cannot
  (e.g. Q8_1) is a ValueError naming it, raised before any weight is loaded.
  Names are mapped to HF's with gguf's own ``TensorNameMap``.
- llama.cpp permutes the rows of Q and K for the "llama" architecture (its
  RoPE pairs adjacent dims, HF's pairs the two halves); we undo it.
- With ``int4_codes`` (a quantization method that keeps 4-bit weights), a linear
  layer's Q4_0 / Q4_1 / Q4_K matrix also carries its codes (``INT4_CODES``),
  rows un-permuted like the values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pagedllm.loader.gguf_dequant import INT4_CODES, dequantize, int4_parts
from pagedllm.loader.gguf_reader import read_gguf

logger = logging.getLogger(__name__)

# Architectures whose Q/K rows convert_hf_to_gguf.py permutes.
_PERMUTED_ARCHS = ("llama",)


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


_HEAD_NAMES = ("token_embd.weight", "output.weight")  # the embedding and the output head


def linear_weight_types(path: str) -> set[str]:
    """The GGML types of the file's matrices other than the embedding and the output head (its linear layers)."""
    return {t.tensor_type.name for t in read_gguf(path).tensors if len(t.shape) == 2 and t.name not in _HEAD_NAMES}


def count_gguf_tensors(path: str) -> int:
    return len(read_gguf(path).tensors)


def iter_gguf_weights(path: str, hf_config: Any, hf_names: Iterable[str],
                      int4_codes: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for each GGUF tensor whose HF name is in ``hf_names``; with
    ``int4_codes`` 4-bit matrices also carry their codes (``INT4_CODES``)."""
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
        parts = None
        if int4_codes and len(tensor.shape) == 2 and tensor.name not in _HEAD_NAMES:  # linear layers only
            parts = int4_parts(tensor.data, tensor.tensor_type)
        heads = (num_heads if ".attn_q." in tensor.name else num_kv_heads if ".attn_k." in tensor.name
                 else None) if arch in _PERMUTED_ARCHS else None
        if heads is not None:
            weights = _unpermute_rows(weights, heads)
            parts = None if parts is None else tuple(_unpermute_rows(p, heads) for p in parts)
        if not weights.flags.writeable:  # F32 tensors are views of the read-only memory map
            weights = weights.copy()
        weights = torch.from_numpy(weights)
        if parts is not None:
            setattr(weights, INT4_CODES, tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in parts))
        yield hf_name, weights


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

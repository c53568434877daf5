"""Test helper: write a HF model as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does.

Metadata under ``{arch}.*``, tensors renamed with gguf's TensorNameMap, Q/K
rows permuted for the "llama" architecture, an optional ``rope_freqs`` tensor
(llama.cpp's form of Llama 3 rope scaling), and an optional override of one
tensor's type, to produce files the loader must refuse.
"""

import gguf
import numpy as np


def llama_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute(): HF's half-split RoPE layout -> llama.cpp's interleaved one."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, arch: str, rope_freqs: np.ndarray | None = None,
               raw_tensor: tuple[str, np.ndarray, gguf.GGMLQuantizationType] | None = None,
               linear_type: gguf.GGMLQuantizationType | None = None) -> None:
    """``linear_type``: the blocks' matrices (not the embedding / head) quantized to this type."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None)
                              else config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            data = llama_permute(data, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            data = llama_permute(data, config.num_key_value_heads)
        if linear_type is not None and gguf_name.startswith("blk.") and data.ndim == 2:
            writer.add_tensor(gguf_name, quantize(np.ascontiguousarray(data), linear_type), raw_dtype=linear_type)
            continue
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if raw_tensor is not None:
        name, data, qtype = raw_tensor
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_freqs(head_dim: int, theta: float, factor: float, low_freq_factor: float = 1.0,
                      high_freq_factor: float = 4.0, old_context_len: int = 8192) -> np.ndarray:
    """The per-frequency divisors convert_hf_to_gguf.py stores for Llama 3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_context_len / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """A float32 (rows, k) matrix (k a multiple of 256) as llama.cpp's Q4_K blocks (uint8 (rows, k / 256 * 144)),
    packed from ggml's block_q4_K layout: [d f16 | dmin f16 | 12 B of eight 6-bit (scale, min) | 128 B nibbles];
    sub-block j of 32 values is x = d * sc_j * q - dmin * m_j (a simple min/max quantizer, not llama.cpp's)."""
    rows, k = w.shape
    sub = w.reshape(rows, k // 256, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(-1), 0)  # x >= -dmin * m with m >= 0
    spread = (sub.max(-1) - low) / 15
    d = (spread.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-low.min(-1) / 63).astype(np.float16).astype(np.float32)
    d, dmin = np.where(d > 0, d, 1), np.where(dmin > 0, dmin, 1)
    sc = np.clip(np.ceil(spread / d[..., None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin[..., None]), 0, 63).astype(np.uint8)
    scale, offset = d[..., None] * sc, dmin[..., None] * m
    q = np.clip(np.round((sub + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((rows, k // 256, 12), dtype=np.uint8)
    packed[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    packed[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    nibbles = q.reshape(rows, k // 256, 4, 2, 32)  # sub-blocks (2i, 2i + 1) share 32 bytes: low, high nibble
    qs = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).reshape(rows, k // 256, 128)
    head = np.stack([d, dmin], -1).astype(np.float16).view(np.uint8).reshape(rows, k // 256, 4)
    return np.concatenate([head, packed, qs], -1).reshape(rows, -1)


def quantize(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``w`` in ``qtype``: the gguf package's quantizer, or ``quantize_q4_k`` (gguf has none for Q4_K)."""
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(w)
    return gguf.quants.quantize(w, qtype)

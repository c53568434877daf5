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
               raw_tensor: tuple[str, np.ndarray, gguf.GGMLQuantizationType] | None = None) -> None:
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

"""GGUF loading: tiny models written the way llama.cpp writes them must give HF's logits back.

The reference is the HF model the GGUF was written from (tensors stored as
F32, so no quantization error): this checks name mapping, the llama Q/K row
un-permutation, Llama 3 rope scaling recovered from ``rope_freqs``, Qwen2
biases and Qwen3 q/k norms with an explicit head_dim. The real quantized
SmolLM2 file is compared with HF in tests/models/test_llama.py.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import load_model, resolve_model
from tests.loader.gguf_writer import llama3_rope_freqs, write_gguf
from tests.models.paged_driver import PagedDriver

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
PROMPTS = [[3, 14, 15, 92, 65, 35], list(range(40, 53))]


def random_hf_model(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def assert_same_logits(path, hf_model):
    model_config = ModelConfig(model=str(path), dtype="float32")
    model = load_model(model_config, torch.device("cpu"), get_backend("torch"))
    assert model_config.load_format == "gguf"
    outs = PagedDriver(model, model_config.hf_config, block_size=4, num_blocks=32).step(list(enumerate(PROMPTS)))
    for ids, ours in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() <= 1e-3 * (ref.max() - ref.min()).item()
    return model_config


def test_llama_gguf_with_llama3_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf_model = random_hf_model(LlamaConfig(**COMMON, max_position_embeddings=16384, rope_theta=500000.0,
                                           rope_scaling=rope, tie_word_embeddings=False))
    freqs = llama3_rope_freqs(head_dim=16, theta=500000.0, factor=8.0)
    assert freqs.min() == 1.0 and freqs.max() == 8.0  # some frequencies are scaled, some are not
    write_gguf(tmp_path / "llama.gguf", hf_model, "llama", rope_freqs=freqs)
    model_config = assert_same_logits(tmp_path / "llama.gguf", hf_model)
    assert model_config.hf_config.architectures == ["LlamaForCausalLM"]


def test_qwen2_gguf_biases_tied(tmp_path):
    hf_model = random_hf_model(Qwen2Config(**COMMON, max_position_embeddings=128, tie_word_embeddings=True))
    write_gguf(tmp_path / "qwen2.gguf", hf_model, "qwen2")
    assert_same_logits(tmp_path / "qwen2.gguf", hf_model)


def test_qwen3_gguf_qk_norm_and_head_dim(tmp_path):
    hf_model = random_hf_model(Qwen3Config(**COMMON, head_dim=24, max_position_embeddings=128,
                                           tie_word_embeddings=False))
    write_gguf(tmp_path / "qwen3.gguf", hf_model, "qwen3")
    model_config = assert_same_logits(tmp_path / "qwen3.gguf", hf_model)
    assert model_config.hf_config.head_dim == 24


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    hf_model = random_hf_model(Qwen2Config(**COMMON, max_position_embeddings=128, tie_word_embeddings=True))
    # Q8_1 is llama.cpp's activation format: a valid GGUF type that the gguf package cannot dequantize.
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((4, 64 // block_size * type_size), dtype=np.uint8)
    extra = ("extra.weight", raw, gguf.GGMLQuantizationType.Q8_1)
    write_gguf(tmp_path / "q81.gguf", hf_model, "qwen2", raw_tensor=extra)
    with pytest.raises(ValueError, match="Q8_1"):
        load_model(ModelConfig(model=str(tmp_path / "q81.gguf")), torch.device("cpu"), get_backend("torch"))


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    hf_model = random_hf_model(LlamaConfig(**COMMON, max_position_embeddings=128, tie_word_embeddings=True))
    write_gguf(tmp_path / "odd.gguf", hf_model, "llama", rope_freqs=np.linspace(1.0, 3.0, 8))
    with pytest.raises(ValueError, match="rope_freqs"):
        resolve_model(ModelConfig(model=str(tmp_path / "odd.gguf")), "cpu")

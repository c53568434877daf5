"""Tiny random Llama, Mistral, Qwen2 and Qwen3 checkpoints: saved by HF, loaded by our loader, same logits.

Each config exercises a variation of the family: GQA, biases (Qwen2 q/k/v,
Llama attention_bias and mlp_bias), Qwen3's per-head q/k norm, an explicit
head_dim, tied and untied embeddings, llama3 and linear rope scaling, and a
sharded checkpoint. All parameters (biases and norm scales included) are
randomised before saving so that none of them can load wrongly unnoticed.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import load_model
from pagedllm.models.registry import get_model_class, kv_cache_shape_info
from tests.models.paged_driver import PagedDriver

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CONFIGS = {
    "llama-gqa-llama3-rope-untied": lambda: LlamaConfig(
        **COMMON, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    "llama-mha-linear-rope-biases-tied": lambda: LlamaConfig(
        **COMMON, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0},
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral-gqa-head-dim": lambda: MistralConfig(
        **COMMON, num_key_value_heads=1, head_dim=32, sliding_window=None, tie_word_embeddings=False),
    "qwen2-bias-tied-sharded": lambda: Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-qk-norm-head-dim": lambda: Qwen3Config(
        **COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
PROMPTS = [[5, 17, 42, 99, 3], list(range(20, 37)), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200]]


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(HF model, saved directory) for one config."""
    torch.manual_seed(0)
    hf_config = CONFIGS[request.param]()
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    directory = tmp_path_factory.mktemp(request.param)
    shard = "40KB" if "sharded" in request.param else "1GB"
    hf_model.save_pretrained(directory, max_shard_size=shard)
    if "sharded" in request.param:
        assert (directory / "model.safetensors.index.json").exists()
    return hf_model, str(directory)


def load_ours(directory, dtype="float32"):
    model_config = ModelConfig(model=directory, dtype=dtype)
    return load_model(model_config, torch.device("cpu"), get_backend("torch")), model_config


def test_logits_match_hf(checkpoint):
    hf_model, directory = checkpoint
    model, model_config = load_ours(directory)
    assert model_config.load_format == "hf" and model_config.torch_dtype == torch.float32
    driver = PagedDriver(model, model_config.hf_config, block_size=4, num_blocks=32)
    outs = driver.step(list(enumerate(PROMPTS)))
    for ids, ours in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        tol = 1e-3 * (ref.max() - ref.min()).item()
        assert (ours - ref).abs().max().item() <= tol


def test_chunked_greedy_matches_hf_generate(checkpoint):
    hf_model, directory = checkpoint
    model, model_config = load_ours(directory)
    with torch.no_grad():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
                    for p in PROMPTS]
    driver = PagedDriver(model, model_config.hf_config, block_size=4, num_blocks=64)
    assert driver.greedy(PROMPTS, 12, first_chunk=3) == expected


def test_bfloat16_load(checkpoint):
    hf_model, directory = checkpoint
    model, model_config = load_ours(directory, dtype="bfloat16")
    assert model_config.torch_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ours = PagedDriver(model, model_config.hf_config, 4, 16, dtype=torch.bfloat16).step([(0, PROMPTS[1])])[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPTS[1]])).logits[0]
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 0.05 * (ref.max() - ref.min()).item()


def test_registry_and_cache_geometry(checkpoint):
    hf_model, _ = checkpoint
    config = hf_model.config
    assert get_model_class(config).__name__ == "LlamaForCausalLM"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert kv_cache_shape_info(config) == (2, config.num_key_value_heads, head_dim)


def test_cache_geometry_is_per_tensor_parallel_rank(checkpoint):
    config = checkpoint[0].config
    layers, kv_heads, head_dim = kv_cache_shape_info(config)
    if kv_heads % 2 == 0:
        assert kv_cache_shape_info(config, tp_size=2) == (layers, kv_heads // 2, head_dim)
    # More ranks than KV heads: one replicated head each, when the rank count is a multiple of theirs.
    assert kv_cache_shape_info(config, tp_size=2 * kv_heads) == (layers, 1, head_dim)
    if kv_heads > 1:
        with pytest.raises(ValueError, match="num_key_value_heads"):
            kv_cache_shape_info(config, tp_size=kv_heads + 1)
    assert kv_cache_shape_info(config, pp_rank=1, pp_size=2) == (layers - layers // 2, kv_heads, head_dim)

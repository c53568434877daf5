"""Fixtures shared by the server tests."""

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer, loaded as the server loads it (once per session: it takes seconds)."""
    from pagedllm.config import ModelConfig
    from pagedllm.loader import load_tokenizer

    return load_tokenizer(ModelConfig(model=None))

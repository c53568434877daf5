"""Shared test configuration: GPU tests skip on machines without CUDA; shared fixtures."""

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The default model's tokenizer, loaded as the engine loads it (once per session: it takes seconds)."""
    from pagedllm.config import ModelConfig
    from pagedllm.loader import load_tokenizer

    return load_tokenizer(ModelConfig(model=None))

"""Shared test configuration: GPU tests skip on machines without CUDA; shared fixtures."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on a machine without a GPU. Set here, before any test module
    # imports triton: the interpreter cannot run some tl functions once triton was imported without it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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

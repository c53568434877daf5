"""A real server shared by the server modules that need no API key (started once per session)."""

import pytest

from tests.server.launch import running_server


@pytest.fixture(scope="session")
def open_server(tmp_path_factory) -> str:
    """Base URL of `pagedllm.server.api_server` on the default model, no API key, max_model_len 512."""
    log = tmp_path_factory.mktemp("open_server") / "server.log"
    # fp32: the parity tests compare with HF transformers fp32 token for token (the CPU default is bf16 weights).
    with running_server(log, "--max-model-len", "512", "--dtype", "float32") as base:
        yield base

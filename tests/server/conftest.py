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


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory) -> str:
    """The default model with the tools/fields flags: auto tool choice (hermes), request chat templates
    trusted, --max-logprobs 5 (tests/server/test_tools.py, test_fields.py)."""
    log = tmp_path_factory.mktemp("tools_server") / "server.log"
    with running_server(log, "--max-model-len", "1024", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                        "--trust-request-chat-template", "--max-logprobs", "5") as base:
        yield base

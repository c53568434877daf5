"""`--served-model-name` through the real server and the official openai client: the name the API knows."""

from __future__ import annotations

import openai
import pytest

from tests.server.launch import running_server

NAME = "team/smol-chat"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("served_name") / "server.log"
    with running_server(log, "--max-model-len", "256", "--served-model-name", NAME) as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
            yield client


def test_models_lists_only_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_requests_by_the_served_name_answer_with_it(client):
    completion = client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert completion.model == NAME and completion.usage.completion_tokens == 2
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.model == NAME


def test_the_model_file_name_is_not_served_under_another_name(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="Hello", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "SmolLM2-135M-Instruct.Q4_1.gguf" in str(info.value)

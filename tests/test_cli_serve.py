"""`pagedllm serve` with vLLM's frontend flags from a --config YAML: CORS, root path, request and stats lines."""

from __future__ import annotations

import httpx
import pytest

from tests.server.launch import running_server

ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[str, object]:
    tmp = tmp_path_factory.mktemp("serve_yaml")
    config = tmp / "serve.yaml"
    config.write_text(f"max-model-len: 256\nserved-model-name: yaml-model\nallowed-origins: '[\"{ORIGIN}\"]'\n"
                      "root-path: /proxied\nenable-prefix-caching: false\ndevice: cpu\n")
    log = tmp / "server.log"
    mp = pytest.MonkeyPatch()
    mp.setenv("PAGEDLLM_LOG_STATS_INTERVAL", "0.2")  # the server inherits the environment
    try:
        with running_server(log, "--config", str(config), "--max-model-len", "200") as base:
            yield base, log
    finally:
        mp.undo()


def test_config_file_sets_flags_and_the_command_line_wins(served) -> None:
    base, _ = served
    card = httpx.get(f"{base}/v1/models").json()["data"][0]
    assert card["id"] == "yaml-model" and card["max_model_len"] == 200


def test_cors_answers_the_allowed_origin_only(served) -> None:
    base, _ = served
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(f"{base}/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{base}/v1/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_root_path_is_advertised(served) -> None:
    base, _ = served
    assert httpx.get(f"{base}/openapi.json").json()["servers"] == [{"url": "/proxied"}]


def test_one_line_per_request_and_periodic_stats(served, smollm2_tokenizer) -> None:
    base, log = served
    num_prompt_tokens = len(smollm2_tokenizer.encode("The capital of France is"))
    body = {"model": "yaml-model", "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
    text = log.read_text()
    requests = [line for line in text.splitlines() if "Received request" in line]
    assert len(requests) == 1, requests
    assert f"prompt {num_prompt_tokens} tokens" in requests[0] and "max_tokens=24" in requests[0]
    assert "Avg generation throughput" in text and "Running:" in text and "KV cache usage" in text


def test_models_retrieve_through_the_openai_client(served) -> None:
    import openai

    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    model = client.models.retrieve("yaml-model")
    assert model.id == "yaml-model" and model.max_model_len == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other/model")

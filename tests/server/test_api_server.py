"""The HTTP/protocol layer in-process (httpx ASGI transport) over the toy engine: shapes, errors, auth.

Fast and deterministic; the behaviour against the real model is in test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.api_server import _validation_error, build_app, make_arg_parser
from tests.server.toy_engine import ToyEngine, expected_text

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served():
    engine = ToyEngine()
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, "toy-model", api_key=KEY)
    yield engine, async_engine, app
    async_engine.shutdown()


def call(app, method: str, path: str, body=None, headers=AUTH, content: bytes | None = None):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, json=body, content=content, headers=headers)

    return asyncio.run(run())


def sse_events(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_health_version_metrics(served):
    _, _, app = served
    models = call(app, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["toy-model"] and models["data"][0]["max_model_len"] == 64
    assert call(app, "GET", "/health", headers={}).status_code == 200
    assert call(app, "GET", "/version", headers={}).json()["version"]
    text = call(app, "GET", "/metrics", headers={}).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "num_preemptions_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert f"pagedllm:{name}" in text, name


def test_completion_whole_and_streamed_agree(served):
    _, _, app = served
    body = {"model": "toy-model", "prompt": ["ab", "xy"], "max_tokens": 4, "n": 2}
    whole = call(app, "POST", "/v1/completions", body).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-") and whole["model"] == "toy-model"
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in whole["choices"]] == ["cdef", "cdef", "z{|}", "z{|}"]
    assert all(c["finish_reason"] == "length" for c in whole["choices"])
    assert whole["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}

    events = sse_events(call(app, "POST", "/v1/completions",
                             {**body, "stream": True, "stream_options": {"include_usage": True}}))
    texts = ["", "", "", ""]
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    finishes = [c["index"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert sorted(finishes) == [0, 1, 2, 3]  # exactly one finish chunk per choice


def test_completion_stop_echo_and_logprobs(served):
    _, _, app = served
    stopped = call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 10, "stop": ["fg"]}).json()
    assert stopped["choices"][0]["text"] == "cde" and stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["stop_reason"] == "fg"

    echoed = call(app, "POST", "/v1/completions", {"prompt": [104, 105], "max_tokens": 3, "echo": True,
                                                   "logprobs": 1}).json()["choices"][0]
    assert echoed["text"] == "hi" + expected_text("hi", 3)
    lp = echoed["logprobs"]
    assert lp["tokens"] == list("hijkl") and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["token_logprobs"][:2] == [None, None]  # the toy engine returns no prompt logprobs
    assert lp["token_logprobs"][2:] == [-0.5] * 3
    assert lp["top_logprobs"][2] == {"j": -0.5, "k": -1.5}


def test_chat_whole_and_streamed(served):
    _, _, app = served
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hey"}]}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 2}
    whole = call(app, "POST", "/v1/chat/completions", body).json()
    choice = whole["choices"][0]
    assert whole["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_text("<assistant>", 3) and choice["finish_reason"] == "length"
    assert whole["usage"]["prompt_tokens"] == len("<user>hey<assistant>")
    first = choice["logprobs"]["content"][0]
    assert first["token"] == "?" and first["bytes"] == [63]
    assert [t["token"] for t in first["top_logprobs"]] == ["?", "@"]

    streamed = call(app, "POST", "/v1/chat/completions", {**body, "stream": True})
    assert streamed.headers["cache-control"] == "no-cache"  # proxies must pass each event on, not hold them
    events = sse_events(streamed)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    streamed_lps = [token for e in events if e["choices"][0].get("logprobs")
                    for token in e["choices"][0]["logprobs"]["content"]]
    assert streamed_lps == choice["logprobs"]["content"]


def test_chat_stream_with_n_choices(served):
    _, _, app = served
    body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(call(app, "POST", "/v1/chat/completions", body))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    contents = {0: "", 1: ""}
    for event in events[2:-1]:
        choice = event["choices"][0]
        contents[choice["index"]] += choice["delta"].get("content", "")
    assert contents == {0: expected_text("<assistant>", 3), 1: expected_text("<assistant>", 3)}
    assert sum(1 for e in events for c in e["choices"] if c.get("finish_reason")) == 2
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_engine_failure_is_reported_to_the_request_not_the_server(served):
    engine, _, app = served
    engine.fail_next_steps = 1
    events = sse_events(call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3, "stream": True}))
    error = events[-1]["error"]
    # The details stay in the log; the client gets a generic message with an id to quote.
    assert error["type"] == "server_error" and "request id err-" in error["message"]
    assert "toy engine failure" not in error["message"]
    engine.fail_next_steps = 1
    response = call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3})
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert call(app, "GET", "/health", headers={}).status_code == 200
    ok = call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})
    assert ok.json()["choices"][0]["text"] == "cd"


# (body or raw bytes, path, expected status, expected error param)
BAD_REQUESTS = [
    ({"prompt": "a", "temperature": "hot"}, "/v1/completions", 400, "temperature"),
    ({"prompt": "a", "temperature": -1.0}, "/v1/completions", 400, "temperature"),
    ({"prompt": "a", "n": 0}, "/v1/completions", 400, "n"),
    ({"prompt": "a", "n": 1.5}, "/v1/completions", 400, "n"),
    ({"prompt": "a", "top_p": 2}, "/v1/completions", 400, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, "/v1/completions", 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 64}, "/v1/completions", 400, "max_tokens"),
    ({"prompt": "a", "logprobs": 21}, "/v1/completions", 400, "logprobs"),
    ({"prompt": ""}, "/v1/completions", 400, "prompt"),
    ({"prompt": []}, "/v1/completions", 400, "prompt"),
    ({"prompt": [1, 100000]}, "/v1/completions", 400, "prompt"),
    ({"prompt": [1, "a"]}, "/v1/completions", 400, "prompt"),
    ({"max_tokens": 3}, "/v1/completions", 400, "prompt"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "/v1/completions", 400, "stream_options"),
    ({"prompt": "a", "model": "gpt-4"}, "/v1/completions", 404, "model"),
    (b"{not json", "/v1/completions", 400, None),
    ({"messages": []}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": "hi"}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "/v1/chat/completions", 400,
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100}, "/v1/chat/completions",
     400, "max_tokens"),
]


@pytest.mark.parametrize(("body", "path", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, path, status, param):
    _, _, app = served
    if isinstance(body, bytes):
        response = call(app, "POST", path, content=body, headers={**AUTH, "content-type": "application/json"})
    else:
        response = call(app, "POST", path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "pydantic" not in error["message"] and "errors.pydantic.dev" not in response.text
    ok = call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "cd"


def test_api_key_is_required_on_v1_routes(served):
    _, _, app = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = call(app, "GET", "/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert call(app, "GET", "/v1/models").status_code == 200
    assert call(app, "GET", "/health", headers={}).status_code == 200


def test_unknown_route_and_method_use_the_error_shape(served):
    _, _, app = served
    assert call(app, "GET", "/nope").json()["error"]["type"] == "invalid_request_error"
    response = call(app, "GET", "/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_each_app_has_its_own_metrics_registry():
    engine = AsyncEngine(ToyEngine())
    try:
        first, second = build_app(engine, "a"), build_app(engine, "b")
        call(first, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2}, headers={})
        # The finish record reaches the metrics from the engine thread after the response's last output.
        expected = ['pagedllm:e2e_request_latency_seconds_count{model_name="a"} 1.0',
                    'pagedllm:request_success_total{finished_reason="length",model_name="a"} 1.0']
        deadline = time.monotonic() + 10
        while not all(line in (text_a := call(first, "GET", "/metrics", headers={}).text) for line in expected):
            assert time.monotonic() < deadline, text_a
            time.sleep(0.01)
        text_b = call(second, "GET", "/metrics", headers={}).text
        assert 'model_name="b"' in text_b and 'model_name="a"' not in text_b
    finally:
        engine.shutdown()


def test_validation_message_of_a_union_field_names_it():
    from pydantic import ValidationError

    from pagedllm.server.protocol import CompletionRequest

    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": 5})
    from fastapi.exceptions import RequestValidationError

    error = _validation_error(RequestValidationError(info.value.errors()))
    assert error.param == "prompt" and error.status == 400


def test_cli_parses_serve_options(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_API_KEY", "from-env")
    args = make_arg_parser().parse_args(["some/model.gguf", "--port", "9000", "--max-model-len", "512",
                                         "--no-enable-prefix-caching"])
    assert (args.model_tag, args.port, args.host, args.api_key) == ("some/model.gguf", 9000, "127.0.0.1", "from-env")
    assert args.max_model_len == 512 and args.enable_prefix_caching is False
    assert make_arg_parser().parse_args([]).uvicorn_log_level == "info"
    assert make_arg_parser().parse_args(["--uvicorn-log-level", "info"]).uvicorn_log_level == "info"
    with pytest.raises(SystemExit):
        make_arg_parser().parse_args(["--uvicorn-log-level", "verbose"])


def test_priority_and_prompt_logprobs_reach_the_engine(served):
    engine, _, app = served
    before = len(engine.added)
    body = {"prompt": ["ab", "cd"], "max_tokens": 2, "priority": -3, "prompt_logprobs": 2}
    assert call(app, "POST", "/v1/completions", body).status_code == 200
    chat = {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 2, "priority": 4}
    assert call(app, "POST", "/v1/chat/completions", chat).status_code == 200
    added = engine.added[before:]
    assert [(r.priority, r.params.prompt_logprobs) for r in added] == [(-3, 2), (-3, 2), (4, None)]


def test_engine_death_fails_the_request_in_flight_and_turns_health_503():
    """The engine breaks between steps (its has_unfinished_requests raises, as a lost device would): the request
    in flight ends with a 503 instead of waiting forever, /health answers 503 with the cause, new requests 503."""
    engine = ToyEngine(step_delay=0.01)
    engine.step_gate = threading.Event()
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, "toy-model")

    def broken() -> bool:
        raise RuntimeError("device lost")

    async def in_flight() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 50}))
            await asyncio.to_thread(engine.step_entered.wait, 5)  # the request is running
            engine.has_unfinished_requests = broken
            engine.step_gate.set()
            return await asyncio.wait_for(task, 10)

    try:
        assert call(app, "GET", "/health", headers={}).status_code == 200
        response = asyncio.run(in_flight())
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_dead"
        health = call(app, "GET", "/health", headers={})
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        late = call(app, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2}, headers={})
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
    finally:
        async_engine.shutdown()

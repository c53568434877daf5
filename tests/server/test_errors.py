"""Error hygiene: invalid Unicode is a 400, whole-body errors have a null param, unexpected
exceptions are generic 500s with a request id, and /openapi.json documents what the server sends.

Against the shared real server (``open_server``), except the 500, which needs a fault that
no input can cause: that one runs in-process over the toy engine.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.api_server import build_app
from pagedllm.server.serving_completion import OpenAIServingCompletion
from tests.server.toy_engine import ToyEngine

# JSON text with a lone surrogate escape: valid JSON, not valid Unicode.
SURROGATE = "\\ud800"


def post_raw(base: str, path: str, text: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/{path}", content=text.encode(), timeout=60,
                      headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path, text, param", [
    ("completions", '{"prompt": "a%sb", "max_tokens": 1}', "prompt"),
    ("completions", '{"prompt": ["ok", "%s"], "max_tokens": 1}', "prompt"),
    ("completions", '{"prompt": "hi", "stop": ["%s"], "max_tokens": 1}', "stop"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x%s"}], "max_tokens": 1}', "messages"),
    ("chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}], "max_tokens": 1}', "messages"),
])
def test_lone_surrogate_is_a_400_naming_the_field(open_server: str, path: str, text: str, param: str) -> None:
    response = post_raw(open_server, path, text % SURROGATE)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "Unicode" in error["message"]
    assert post_raw(open_server, path, (text % "ok")).status_code == 200  # and the server keeps serving


@pytest.mark.parametrize("text", ['{"prompt": ', "[1, 2]", "null", '"just a string"'])
def test_whole_body_errors_have_a_null_param(open_server: str, text: str) -> None:
    response = post_raw(open_server, "completions", text)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] is None


def test_openapi_documents_what_the_server_sends(open_server: str) -> None:
    schema = httpx.get(f"{open_server}/openapi.json", timeout=30).json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"400", "401", "404", "413", "429", "500", "503"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
        assert "text/event-stream" in responses["200"]["content"]
    assert "ErrorInfo" in schema["components"]["schemas"]  # the $ref inside ErrorResponse resolves
    assert "text/event-stream" not in schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]


def test_unexpected_exception_is_a_generic_500_with_a_request_id(monkeypatch, caplog) -> None:
    async def broken(self, request):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(OpenAIServingCompletion, "create_completion", broken)
    engine = AsyncEngine(ToyEngine())
    try:
        app = build_app(engine, "toy-model")

        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})

        with caplog.at_level(logging.ERROR):
            response = asyncio.run(run())
    finally:
        engine.shutdown()
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert error["type"] == "server_error" and error["code"] == "internal_error" and error["param"] is None
    assert "secret" not in error["message"] and "RuntimeError" not in error["message"]
    assert request_id in error["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])  # the details are in the log

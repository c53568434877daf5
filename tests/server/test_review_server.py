"""Review regressions against the real server: one bad request must get its own OpenAI-shaped 400 and
leave the requests running beside it untouched."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.launch import running_server

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    log = tmp_path_factory.mktemp("review_server") / "server.log"
    with running_server(log, "--max-model-len", "256", "--device", "cpu") as url:
        yield url


def _bystander_and_bad(base: str, bad_path: str, bad_body: dict) -> tuple[httpx.Response, httpx.Response]:
    """Start a 40-token request, send `bad_body` while it runs; return (bad response, bystander response)."""
    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            bystander = asyncio.create_task(client.post("/v1/completions", json={
                "model": MODEL, "prompt": "Tell me a story about a lighthouse", "max_tokens": 40,
                "temperature": 0, "ignore_eos": True}))
            await asyncio.sleep(0.3)
            bad = await client.post(bad_path, json=bad_body)
            return bad, await bystander
    return asyncio.run(main())


def _assert_openai_400(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_out_of_range_seed_is_a_400_and_spares_other_requests(base: str) -> None:
    bad, bystander = _bystander_and_bad(base, "/v1/completions",
                                        {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 2**64})
    assert bystander.status_code == 200, bystander.text
    assert bystander.json()["usage"]["completion_tokens"] == 40
    _assert_openai_400(bad, "seed")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [-1], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_request_beside_a_running_one(base: str, path: str, body: dict, param: str) -> None:
    bad, bystander = _bystander_and_bad(base, path, {"model": MODEL, **body})
    _assert_openai_400(bad, param)
    assert bystander.status_code == 200, bystander.text
    assert bystander.json()["usage"]["completion_tokens"] == 40


def test_echo_with_logprobs_covers_prompt_and_completion(base: str) -> None:
    resp = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello world", "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1})
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 2 + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith("Hello world")
    assert lp["text_offset"] == sorted(lp["text_offset"])

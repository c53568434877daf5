"""Review regressions against the real server: one bad request must get its own OpenAI-shaped 400 and
leave the requests running beside it untouched."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("review_server") / "server.log"
    cmd = [sys.executable, "-m", "pagedllm.server.api_server", "--port", str(port), "--max-model-len", "256",
           "--device", "cpu", "--uvicorn-log-level", "warning"]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


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

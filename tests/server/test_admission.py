"""Admission control against the real server, with small limits passed as flags to keep it fast.

Limits on n / best_of / prompts / stop strings (400 naming the field), the bound on
unfinished requests (429 + Retry-After), the body limit (413, also for a chunked body
that never ends), the character check before tokenizing, and --request-timeout (504,
or an error event at the end of a stream; the request's blocks are freed either way).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.launch import server_process

MAX_MODEL_LEN = 256
FLAGS = ("--max-model-len", str(MAX_MODEL_LEN), "--max-n", "4", "--max-prompts-per-request", "2",
         "--max-stop-strings", "2", "--max-stop-string-chars", "8", "--max-waiting-requests", "2",
         "--max-request-body-bytes", "65536", "--request-timeout", "2")
# Long enough to outlive the 2 s deadline on any machine CI runs on (ignore_eos: it cannot stop early).
SLOW = {"max_tokens": MAX_MODEL_LEN - 8, "n": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> tuple[subprocess.Popen, str]:
    log = tmp_path_factory.mktemp("admission") / "server.log"
    with server_process(log, *FLAGS) as proc_and_url:
        yield proc_and_url


@pytest.fixture(scope="module")
def base(server: tuple[subprocess.Popen, str]) -> str:
    return server[1]


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def post(base: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/{path}", json=body, timeout=60, **kwargs)


def wait_idle(base: str) -> None:
    """Until the server admits again (requests aborted by earlier tests may take a step to end)."""
    deadline = time.monotonic() + 30
    while post(base, "completions", {"prompt": "hi", "max_tokens": 1}).status_code == 429:
        assert time.monotonic() < deadline, "the unfinished-request count never went back down"
        time.sleep(0.2)


@pytest.mark.parametrize("path, body, param, words", [
    ("completions", {"prompt": "hi", "n": 5}, "n", "at most 4"),
    ("completions", {"prompt": "hi", "n": 2, "best_of": 5}, "best_of", "at most 4"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "n", "at most 4"),
    ("completions", {"prompt": ["a", "b", "c"]}, "prompt", "at most 2"),
    ("completions", {"prompt": [[1], [2], [3]]}, "prompt", "at most 2"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop", "at most 2"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": "x" * 9}, "stop", "at most 8"),
])
def test_limits_are_400s_naming_the_field(base: str, path: str, body: dict, param: str, words: str) -> None:
    response = post(base, path, {**body, "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_requests_at_the_limits_are_served(client: openai.OpenAI) -> None:
    out = client.completions.create(model=client.models.list().data[0].id, prompt=["a", "b"], n=2,
                                    best_of=4, max_tokens=2, stop=["12345678", "z"])
    assert len(out.choices) == 4


def test_prompt_too_long_by_characters_is_refused_before_tokenizing(base: str) -> None:
    # SmolLM2's longest token is 81 characters: 256 tokens never span more than 256 * 81 = 20,736 of them.
    for path, body in (("completions", {"prompt": "a" * 21_000}),
                       ("chat/completions", {"messages": [{"role": "user", "content": "a" * 21_000}]})):
        response = post(base, path, {**body, "max_tokens": 1})
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert "21000 characters" in error["message"] and error["param"] in ("prompt", "messages")
    # Under the character bound the tokenizer decides: 20,000 "a"s are 5,000 tokens, still too long.
    response = post(base, "completions", {"prompt": "a" * 20_000, "max_tokens": 1})
    assert response.status_code == 400 and "tokens" in response.json()["error"]["message"]


def test_waiting_queue_bound_gives_429_with_retry_after(base: str, client: openai.OpenAI) -> None:
    wait_idle(base)
    model = client.models.list().data[0].id
    held = [client.completions.create(model=model, prompt="Once", stream=True, max_tokens=200,
                                      extra_body={"ignore_eos": True})
            for _ in range(2)]  # the two requests the server may hold
    try:
        for stream in held:
            next(iter(stream))  # both are in the engine
        response = post(base, "completions", {"prompt": "hi", "max_tokens": 1})
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["param"] is None and "--max-waiting-requests" in error["message"]
        assert post(base, "chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).status_code == 429
    finally:
        for stream in held:
            stream.close()
    wait_idle(base)  # closing the streams aborted both: the server admits again


def test_body_over_the_limit_is_413_by_content_length(base: str) -> None:
    response = post(base, "completions", {"prompt": "a" * 70_000, "max_tokens": 1})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["param"] is None and "65536 bytes" in error["message"]


def test_chunked_body_is_cut_off_without_reading_it_all(base: str) -> None:
    """No Content-Length and a body that never ends: 413 once 64 KiB have come, without waiting for the rest."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"prompt": "' + b"a" * 70_000
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # and then nothing more
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_request_timeout_gives_504_and_frees_the_request(base: str) -> None:
    wait_idle(base)
    start = time.monotonic()
    response = post(base, "completions", {"prompt": "Once upon a time", **SLOW})
    assert response.status_code == 504, response.text[:300]
    assert response.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 10
    wait_idle(base)  # aborted, not left running: the unfinished count is back to 0


def test_request_timeout_ends_a_stream_with_an_error_event(base: str) -> None:
    wait_idle(base)
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                      json={"prompt": "Once upon a time", "stream": True, **SLOW}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "server_error"
    assert len(events) > 2  # some tokens were streamed before the deadline
    wait_idle(base)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# The flood's stated memory limit: what 1,200 requests, most of them refused, may leave behind in the server.
FLOOD_RSS_GROWTH_LIMIT_MIB = 64


def test_flood_beyond_the_queue_bound_gets_429s_without_memory_growth(server) -> None:
    """1,200 requests, 100 at a time, against a bound of 2 unfinished requests: every answer is a
    200 or a 429 (no 5xx, none lost), the server's memory stays within the stated limit, and it
    serves normally afterwards."""
    proc, url = server
    wait_idle(url)
    body = {"prompt": "Once upon a time", "max_tokens": 2}

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=120, limits=limits) as http:
            statuses: list[int] = []
            for _ in range(12):  # 100 at a time over 64 connections: under the listen backlog of any host
                replies = await asyncio.gather(*(http.post("/completions", json=body) for _ in range(100)))
                statuses += [r.status_code for r in replies]
            return statuses

    asyncio.run(flood())  # warm-up: connection and allocator pools reach their steady size
    wait_idle(url)
    before = _rss_mib(proc.pid)
    statuses = asyncio.run(flood())
    wait_idle(url)
    growth = _rss_mib(proc.pid) - before
    assert len(statuses) == 1200 and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert growth < FLOOD_RSS_GROWTH_LIMIT_MIB, f"RSS grew {growth:.1f} MiB over a 1,200-request flood"
    print(f"flood: 1200 requests, {statuses.count(200)} x 200, {statuses.count(429)} x 429, "
          f"0 x 5xx, RSS {before:.0f} MiB -> +{growth:.1f} MiB")
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200

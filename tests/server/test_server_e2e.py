"""End to end: the real server (subprocess, default SmolLM2 model) driven by the official openai client and httpx.

One server for the module (the model loads once), with an API key so that the
401 cases run too. Outputs are compared at temperature 0: streamed deltas
against the whole response, concurrent clients against sequential requests.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.server.launch import running_server

KEY = "sk-e2e"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name one color."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    # fp32: concurrent and sequential greedy outputs are compared token for token (docs/CPU.md).
    with running_server(log, "--api-key", KEY, "--max-model-len", "512", "--dtype", "float32") as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(pagedllm:\w+)(\{[^}]*\})? ([-+.\deE]+|NaN)$', line)
        if match:
            labels = match.group(2) or ""
            reason = re.search(r'finished_reason="(\w+)"', labels)
            key = match.group(1) + (f"[{reason.group(1)}]" if reason else "")
            values[key] = float(match.group(3))
    return values


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"]


def test_completion_streamed_equals_whole_with_usage(client, tokenizer):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.id and whole.created and whole.model == MODEL and whole.object == "text_completion"
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_streamed_equals_whole_role_first(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10,
                                           temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert whole.usage.completion_tokens <= 10 and whole.usage.prompt_tokens > 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_n_samples(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    best = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, n=1, best_of=3,
                                     seed=1)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    sampled = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, n=3,
                                             seed=7, logprobs=True)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert sampled.usage.completion_tokens == sum(len(c.logprobs.content) for c in sampled.choices)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, n=3,
                                           seed=7, logprobs=True)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))  # greedy: the top token

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                       logprobs=1)
    assert echoed.choices[0].text == PROMPT + out.choices[0].text
    elp = echoed.choices[0].logprobs
    assert len(elp.tokens) == 5 + len(lp.tokens) and elp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in elp.token_logprobs[1:])
    assert elp.token_logprobs[5:] == pytest.approx(lp.token_logprobs)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert token.logprob >= token.top_logprobs[1].logprob
        assert bytes(token.bytes).decode("utf-8") == token.token


def test_stop_strings_whole_and_streamed(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[3:6]  # three characters from the middle, crossing token boundaries
    assert len(stop) == 3 and stop.strip()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


# (path, JSON body or raw bytes, expected status, headers override)
ERROR_CASES = [
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 1.5}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": -1}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 600}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3, 10**9]]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "stream": True, "max_tokens": 10**6}, 400, None),
    ("/v1/completions", b'{"model": ', 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "best_of": 2, "stream": True}, 400, None),
    ("/v1/completions", {"model": "no-such-model", "prompt": PROMPT}, 404, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT}, 401, {}),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT}, 401, {"Authorization": "Bearer nope"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ["x"]}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 30, "logprobs": True},
     400, None),
]


@pytest.mark.parametrize(("path", "body", "status", "headers"), ERROR_CASES)
def test_errors_have_openai_shape_and_server_keeps_working(server, client, path, body, status, headers):
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    if isinstance(body, bytes):
        response = httpx.post(server + path, content=body, headers={**headers, "content-type": "application/json"})
    else:
        response = httpx.post(server + path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    ok = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_disconnect_mid_stream_frees_everything(server):
    before = _metrics(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while True:
        after = _metrics(server)
        idle = (after["pagedllm:num_requests_running"] == 0 and after["pagedllm:num_requests_waiting"] == 0
                and after["pagedllm:kv_cache_usage_perc"] == 0)
        if idle and after.get("pagedllm:request_success_total[abort]", 0) > before.get(
                "pagedllm:request_success_total[abort]", 0):
            break
        assert time.monotonic() < deadline, f"request still holds resources: {after}"
        time.sleep(0.2)
    generated = after["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"]
    assert generated < 200, "the request ran on after the client left"


def test_disconnect_while_waiting_for_a_whole_response_frees_everything(server):
    before = _metrics(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0),
                   headers={"Authorization": f"Bearer {KEY}"})
    key = "pagedllm:request_success_total[abort]"
    deadline = time.monotonic() + 20
    while True:
        after = _metrics(server)
        if after["pagedllm:num_requests_running"] == 0 and after.get(key, 0) > before.get(key, 0):
            break
        assert time.monotonic() < deadline, f"request still running: {after}"
        time.sleep(0.2)
    assert after["pagedllm:kv_cache_usage_perc"] == 0


def test_metrics_after_traffic(server, client):
    # Traffic of its own, so the test passes alone and in any order: the same prompt twice (a prefix
    # cache hit the second time), several tokens each (inter-token latencies), capped by length.
    long_prompt = PROMPT + " " + " ".join(["and so on"] * 12)  # over one 16-token block
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    values = _metrics(server)
    assert values["pagedllm:prompt_tokens_total"] > 0 and values["pagedllm:generation_tokens_total"] > 0
    assert values["pagedllm:time_to_first_token_seconds_count"] > 0
    assert values["pagedllm:inter_token_latency_seconds_count"] > 0
    assert values["pagedllm:e2e_request_latency_seconds_count"] >= values["pagedllm:request_success_total[length]"]
    for name in ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "gpu_cache_usage_perc"):
        assert f"pagedllm:{name}" in values
    assert values["pagedllm:prefix_cache_hits_total"] > 0  # the same prompt was sent many times


def test_64_concurrent_streaming_clients_match_sequential(server, client):
    prompts = [f"{subject} is" for subject in
               ("The sun", "Water", "A cat", "Python", "The ocean", "Music", "A tree", "Paris")]
    sequential = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
                  for p in prompts}

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=100)
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=300)) as aclient:
            return await asyncio.gather(*[one(aclient, prompts[i % len(prompts)]) for i in range(64)])

    results = asyncio.run(run())
    assert results == [sequential[prompts[i % len(prompts)]] for i in range(64)]
    values = _metrics(server)
    assert values["pagedllm:num_requests_running"] == 0 and values["pagedllm:kv_cache_usage_perc"] == 0


def test_sse_lines_are_well_formed(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    for event in events[:-1]:
        chunk = json.loads(event[len("data: "):])
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"].startswith("chatcmpl-")

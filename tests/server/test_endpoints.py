"""The vLLM routes beside the OpenAI ones, against the real server: model card, tokenize, detokenize, ping,
and the embeddings route's documented 404."""

from __future__ import annotations

import httpx
import pytest

from tests.server.sse import post

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Name one color."}]


def test_model_card_by_id(open_server):
    card = httpx.get(f"{open_server}/v1/models/{MODEL}").json()
    listed = httpx.get(f"{open_server}/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model"
    assert {k: v for k, v in card.items() if k != "created"} == {k: v for k, v in listed.items() if k != "created"}
    missing = httpx.get(f"{open_server}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_tokenize_prompt_as_completions_count_it(open_server, smollm2_tokenizer):
    text = "The capital of France is"
    out = post(open_server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert out["tokens"] == smollm2_tokenizer.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512
    assert out["token_strs"] == smollm2_tokenizer.convert_ids_to_tokens(out["tokens"])
    usage = post(open_server, "/v1/completions", {"prompt": text, "max_tokens": 1})["usage"]
    assert usage["prompt_tokens"] == out["count"]


def test_tokenize_messages_as_chat_counts_them(open_server):
    out = post(open_server, "/tokenize", {"messages": MESSAGES})
    usage = post(open_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})["usage"]
    assert out["count"] == usage["prompt_tokens"]
    without = post(open_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert out["tokens"][: without["count"]] == without["tokens"] and without["count"] < out["count"]
    assert "token_strs" not in out


def test_detokenize_round_trip(open_server):
    text = "Paris is the capital of France."
    tokens = post(open_server, "/tokenize", {"prompt": text})["tokens"]
    assert post(open_server, "/detokenize", {"tokens": tokens}) == {"prompt": text}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_bad_tokenization_requests(open_server, path, body, param):
    r = httpx.post(open_server + path, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_as_health(open_server, method):
    assert httpx.request(method, f"{open_server}/ping").status_code == 200


def test_embeddings_is_a_documented_404(open_server):
    r = httpx.post(f"{open_server}/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "embeddings_not_supported" and "API_FIELDS.md" in r.json()["error"]["message"]

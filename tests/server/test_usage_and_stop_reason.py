"""Streamed responses say what whole ones say: the same text, finish_reason, stop_reason and usage.

For each request the real server answers it whole and streamed (raw SSE through httpx, so the
extra ``stop_reason`` field is read as sent). The cases are the ones where a streamed response
differs in shape from a token-per-chunk one: stop strings (held-back text), a stop token, several
choices, multi-byte characters that take more than one token, and an EOS that generation runs past
(ignore_eos: a token with no text, so no chunk, yet it counts in usage).
"""

from __future__ import annotations

import pytest

from tests.server.sse import post, post_stream

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name one color."}]
UNICODE_PROMPT = "Pizza emoji: 🍕🍕🍕🍕"


@pytest.fixture(scope="module")
def period_id(smollm2_tokenizer) -> int:
    ids = smollm2_tokenizer.encode(".")
    assert len(ids) == 1
    return ids[0]


def _cases(period_id: int) -> dict[str, dict]:
    return {
        "length": dict(max_tokens=6, temperature=0),
        "stop_string": dict(max_tokens=12, temperature=0, stop=[" is", "\n\n"]),
        "stop_string_included": dict(max_tokens=12, temperature=0, stop=["answer"], include_stop_str_in_output=True),
        "stop_token": dict(max_tokens=12, temperature=0, stop_token_ids=[period_id]),
        "n_with_stop": dict(max_tokens=8, temperature=1.0, seed=3, n=2, stop=["\n"]),
        "unicode": dict(max_tokens=10, temperature=0),
        "eos_ignored": dict(max_tokens=16, temperature=0, ignore_eos=True),  # the reply's EOS is its 13th token
    }


def _chat_prompt_ids(tokenizer) -> list[int]:
    """MESSAGES through the chat template, as a token-id prompt for /v1/completions."""
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _by_index(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def _check_stream_matches_whole(whole: dict, chunks: list[dict], text_of) -> None:
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    streamed = _by_index(chunks[:-1])
    assert sorted(streamed) == [c["index"] for c in whole["choices"]]
    for choice in whole["choices"]:
        parts = streamed[choice["index"]]
        assert "".join(text_of(p) for p in parts) == text_of(choice, whole=True)
        # A field that is null may be left out of the JSON: .get reads both the same.
        assert [p.get("finish_reason") for p in parts if p.get("finish_reason")] == [choice["finish_reason"]]
        assert parts[-1].get("finish_reason") == choice["finish_reason"]
        assert parts[-1].get("stop_reason") == choice.get("stop_reason")


@pytest.mark.parametrize("case", ["length", "stop_string", "stop_string_included", "stop_token", "n_with_stop",
                                  "unicode", "eos_ignored"])
def test_completion_stream_matches_whole(open_server, smollm2_tokenizer, period_id, case):
    fields = _cases(period_id)[case]
    prompt = {"unicode": UNICODE_PROMPT, "eos_ignored": _chat_prompt_ids(smollm2_tokenizer)}.get(case, PROMPT)
    body = {"prompt": prompt, **fields}
    whole = post(open_server, "/v1/completions", body)
    chunks = post_stream(open_server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    _check_stream_matches_whole(whole, chunks, lambda c, whole=False: c["text"])
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
    if case.startswith("stop_string"):
        assert whole["choices"][0]["stop_reason"] in fields["stop"] and whole["choices"][0]["finish_reason"] == "stop"
    if case == "stop_token":
        assert whole["choices"][0]["stop_reason"] == period_id


@pytest.mark.parametrize("case", ["length", "stop_string", "stop_token", "n_with_stop", "eos_ignored"])
def test_chat_stream_matches_whole(open_server, period_id, case):
    body = {"messages": MESSAGES, **_cases(period_id)[case]}
    whole = post(open_server, "/v1/chat/completions", body)
    chunks = post_stream(open_server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    role_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(role_chunks) == len(whole["choices"])

    def text_of(choice: dict, whole: bool = False) -> str:
        return (choice["message"] if whole else choice["delta"]).get("content") or ""

    _check_stream_matches_whole(whole, chunks, text_of)

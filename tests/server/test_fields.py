"""Every request field, sent through the real server, does what the same SamplingParams do offline.

A table per endpoint: each row is the request fields, the SamplingParams they must become (when the
names differ), and a baseline the field must change the output from (so a field that is dropped or
routed to the wrong parameter fails, e.g. presence and frequency penalties swapped). The server's
choices (text, finish_reason, stop_reason, logprob values, usage) must equal what `LLM.generate` /
`LLM.chat` return for the same SamplingParams. One server for the session, one offline LLM.
"""

from __future__ import annotations

import httpx
import pytest

from pagedllm import SamplingParams
from pagedllm.outputs import RequestOutput
from tests.reference import offline_llm
from tests.server.sse import post, post_stream

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name one color."}]
# Greedy output repeats tokens here, so presence (once per token) and frequency (per occurrence)
# penalties of the same size give different outputs.
REPEATING = "red, blue, red, blue, red, blue,"
GREEDY = dict(temperature=0, max_tokens=8)
SAMPLED = dict(temperature=1.0, seed=7, max_tokens=8)
LONG = dict(temperature=0, max_tokens=16)  # the chat reply ends (EOS) within this
LOGPROB_TOL = 1e-4  # same model, same dtype: only the batch shape of a prefix-cache hit can differ


@pytest.fixture(scope="module")
def llm():
    return offline_llm()


_offline_cache: dict[tuple, RequestOutput] = {}


def offline(llm, prompt: str | list[dict], **params) -> RequestOutput:
    key = (repr(prompt), tuple(sorted((k, repr(v)) for k, v in params.items())))
    if key not in _offline_cache:
        sp = SamplingParams(**params)
        chat = isinstance(prompt, list)
        run = llm.chat(prompt, sp, use_tqdm=False) if chat else llm.generate(prompt, sp, use_tqdm=False)
        _offline_cache[key] = run[0]
    return _offline_cache[key]


def _fingerprint(out: RequestOutput) -> list[tuple]:
    return [(s.text, tuple(s.token_ids)) for s in out.outputs]


class Tok(str):
    """A placeholder in the tables for the one token id of this text (resolved with the model's tokenizer)."""


def _token_id(llm, text: str) -> int:
    (token_id,) = llm.get_tokenizer().encode(text)
    return token_id


# (id, request fields, SamplingParams fields (None: the same as the request's), baseline SamplingParams or None)
COMPLETION_CASES = [
    ("temperature_seed", dict(temperature=0.7, seed=7, max_tokens=8), None, GREEDY),
    ("seed", dict(SAMPLED, seed=8), None, SAMPLED),
    ("top_p", dict(SAMPLED, top_p=0.3), None, SAMPLED),
    ("top_k", dict(SAMPLED, top_k=3), None, SAMPLED),
    ("min_p", dict(SAMPLED, min_p=0.2), None, SAMPLED),
    ("presence_penalty", dict(GREEDY, prompt=REPEATING, presence_penalty=2.0), None,
     dict(GREEDY, prompt=REPEATING, frequency_penalty=2.0)),
    ("frequency_penalty", dict(GREEDY, prompt=REPEATING, frequency_penalty=2.0), None,
     dict(GREEDY, prompt=REPEATING, presence_penalty=2.0)),
    ("repetition_penalty", dict(GREEDY, prompt=REPEATING, repetition_penalty=1.3), None,
     dict(GREEDY, prompt=REPEATING)),
    ("max_tokens", dict(GREEDY, max_tokens=3), None, GREEDY),
    ("stop", dict(GREEDY, stop=["\n\n"]), None, GREEDY),
    ("stop_token_ids", dict(GREEDY, stop_token_ids=Tok(".")), None, GREEDY),
    ("include_stop_str_in_output", dict(GREEDY, stop=["\n\n"], include_stop_str_in_output=True), None,
     dict(GREEDY, stop=["\n\n"])),
    ("n", dict(SAMPLED, n=2), None, SAMPLED),
    ("best_of", dict(SAMPLED, best_of=3), None, SAMPLED),
    ("logprobs", dict(GREEDY, logprobs=2), None, None),
    ("echo", dict(GREEDY, echo=True), GREEDY, None),
    ("echo_logprobs", dict(GREEDY, echo=True, logprobs=1), dict(GREEDY, logprobs=1, prompt_logprobs=1), None),
    ("prompt_logprobs", dict(GREEDY, prompt_logprobs=2), None, None),
    ("priority_and_user", dict(GREEDY, priority=3, user="someone"), GREEDY, None),
]

CHAT_CASES = [
    ("temperature_seed", dict(temperature=0.7, seed=7, max_tokens=8), None, GREEDY),
    ("top_k", dict(SAMPLED, top_k=3), None, SAMPLED),
    # The reply repeats "color" by its 11th token; the completions table tells the two penalties apart.
    ("presence_penalty", dict(GREEDY, max_tokens=12, presence_penalty=2.0), None, dict(GREEDY, max_tokens=12)),
    ("frequency_penalty", dict(GREEDY, max_tokens=12, frequency_penalty=2.0), None, dict(GREEDY, max_tokens=12)),
    ("repetition_penalty", dict(GREEDY, repetition_penalty=1.5), None, GREEDY),
    ("max_completion_tokens", dict(temperature=0, max_completion_tokens=3), dict(temperature=0, max_tokens=3),
     GREEDY),
    ("stop", dict(GREEDY, stop=" a"), None, GREEDY),
    ("n", dict(SAMPLED, n=2), None, SAMPLED),
    ("logprobs", dict(GREEDY, logprobs=True, top_logprobs=3), dict(GREEDY, logprobs=3), None),
    ("stop_token_ids", dict(GREEDY, stop_token_ids=Tok(" most")), None, GREEDY),
    ("min_tokens", dict(GREEDY, min_tokens=3, stop_token_ids=Tok(" most")), None,
     dict(GREEDY, stop_token_ids=Tok(" most"))),
    ("ignore_eos", dict(LONG, ignore_eos=True), None, LONG),
    ("skip_special_tokens", dict(LONG, ignore_eos=True, skip_special_tokens=False), None, dict(LONG, ignore_eos=True)),
    ("spaces_between_special_tokens", dict(LONG, ignore_eos=True, skip_special_tokens=False,
                                           spaces_between_special_tokens=False), None, None),
]


def _resolve(llm, fields: dict | None) -> dict | None:
    if fields is None:
        return None
    return {k: ([_token_id(llm, v)] if isinstance(v, Tok) else v) for k, v in fields.items()}


def _sp_fields(request: dict) -> dict:
    return {k: v for k, v in request.items() if k not in ("echo", "priority", "user", "prompt", "messages")}


def _split(llm, request_fields: dict, sp_fields: dict | None, baseline: dict | None, key: str, default):
    """(prompt, request fields, SamplingParams fields, baseline SamplingParams fields) of one table row."""
    request_fields, baseline = _resolve(llm, request_fields), _resolve(llm, baseline)
    prompt = request_fields.get(key, default)
    sp_fields = _resolve(llm, sp_fields) or _sp_fields(request_fields)
    return prompt, {key: prompt, **request_fields}, sp_fields, baseline and _sp_fields(baseline)


@pytest.mark.parametrize(("request_fields", "sp_fields", "baseline"), [c[1:] for c in COMPLETION_CASES],
                         ids=[c[0] for c in COMPLETION_CASES])
def test_completion_field_matches_offline(open_server, llm, request_fields, sp_fields, baseline):
    prompt, request_fields, sp_fields, baseline = _split(llm, request_fields, sp_fields, baseline, "prompt", PROMPT)
    expected = offline(llm, prompt, **sp_fields)
    if baseline is not None:
        assert _fingerprint(expected) != _fingerprint(offline(llm, prompt, **baseline)), "the field has no effect"
    response = post(open_server, "/v1/completions", request_fields)
    echo = request_fields.get("echo", False)
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(len(expected.outputs)))
    for choice, sample in zip(choices, expected.outputs, strict=True):
        assert choice["text"] == (prompt if echo else "") + sample.text
        assert (choice["finish_reason"], choice["stop_reason"]) == (sample.finish_reason, sample.stop_reason)
        if request_fields.get("logprobs") is not None:
            lp = choice["logprobs"]
            generated = lp["token_logprobs"][len(lp["token_logprobs"]) - len(sample.token_ids):]
            assert generated == pytest.approx([step[t].logprob for t, step in zip(sample.token_ids, sample.logprobs)],
                                              abs=LOGPROB_TOL)
            assert all(len(top) <= request_fields["logprobs"] + 1 for top in lp["top_logprobs"] if top)
            if echo:
                prompt_part = lp["token_logprobs"][: len(expected.prompt_token_ids)]
                want = [None] + [step[t].logprob for t, step in zip(expected.prompt_token_ids[1:],
                                                                       expected.prompt_logprobs[1:])]
                assert prompt_part[0] is None and prompt_part[1:] == pytest.approx(want[1:], abs=LOGPROB_TOL)
    usage = response["usage"]
    assert usage["prompt_tokens"] == len(expected.prompt_token_ids)
    assert usage["completion_tokens"] == sum(len(s.token_ids) for s in expected.outputs)


@pytest.mark.parametrize(("request_fields", "sp_fields", "baseline"), [c[1:] for c in CHAT_CASES],
                         ids=[c[0] for c in CHAT_CASES])
def test_chat_field_matches_offline(open_server, llm, request_fields, sp_fields, baseline):
    messages, request_fields, sp_fields, baseline = _split(llm, request_fields, sp_fields, baseline, "messages",
                                                           MESSAGES)
    expected = offline(llm, messages, **sp_fields)
    if baseline is not None:
        assert _fingerprint(expected) != _fingerprint(offline(llm, messages, **baseline)), "the field has no effect"
    response = post(open_server, "/v1/chat/completions", request_fields)
    choices = response["choices"]
    assert [c["index"] for c in choices] == list(range(len(expected.outputs)))
    for choice, sample in zip(choices, expected.outputs, strict=True):
        assert choice["message"] == {"role": "assistant", "content": sample.text}
        assert (choice["finish_reason"], choice["stop_reason"]) == (sample.finish_reason, sample.stop_reason)
        if request_fields.get("logprobs"):
            content = choice["logprobs"]["content"]
            want = [step[t].logprob for t, step in zip(sample.token_ids, sample.logprobs)]
            assert [t["logprob"] for t in content] == pytest.approx(want, abs=LOGPROB_TOL)
            for token, step in zip(content, sample.logprobs):
                top = sorted(lp.logprob for lp in step.values())[::-1][: request_fields["top_logprobs"]]
                assert [t["logprob"] for t in token["top_logprobs"]] == pytest.approx(top, abs=LOGPROB_TOL)
    usage = response["usage"]
    assert usage["prompt_tokens"] == len(expected.prompt_token_ids)
    assert usage["completion_tokens"] == sum(len(s.token_ids) for s in expected.outputs)


# ---- fields that were ignored before: each changes the output as documented, or is a 400 -------------------
def _post_raw(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=300)


def _assert_400(response: httpx.Response, param: str, match: str = "") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and match in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value", "match"), [
    ("frobnicate", 1, "not a field of this API"),
    ("functions", [], "use tools"),
    ("logits_processors", ["x"], "not implemented"),
    ("prompt_embeds", "AAAA", "text or token ids"),
    ("length_penalty", 0.5, "use_beam_search"),
    ("truncate_prompt_tokens", 0, ">= 1"),
])
def test_unimplemented_fields_are_400_naming_them(open_server, path, field, value, match):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    _assert_400(_post_raw(open_server, path, {**body, "max_tokens": 2, field: value}), field, match)


@pytest.mark.parametrize(("fields", "param"), [
    (dict(store=True), "store"), (dict(modalities=["audio"]), "modalities"),
    (dict(service_tier="flex"), "service_tier"),
    (dict(add_generation_prompt=True, continue_final_message=True), "continue_final_message"),
    (dict(chat_template_kwargs={"tools": []}), "chat_template_kwargs"),
    (dict(chat_template="{{ messages }}"), "chat_template"),  # this server does not trust request templates
    (dict(use_beam_search=True, stream=True), "use_beam_search"),
    (dict(use_beam_search=True, top_p=0.5), "top_p"),
    (dict(prompt_logprobs=1, stream=True), "prompt_logprobs"),
])
def test_chat_field_refusals(open_server, fields, param):
    _assert_400(_post_raw(open_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, **fields}),
                param)


def test_accepted_no_op_fields_do_not_change_the_reply(open_server):
    plain = post(open_server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY})
    noted = post(open_server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY, "metadata": {"k": "v"},
                                                       "store": False, "service_tier": "auto", "modalities": ["text"],
                                                       "prompt_cache_key": "k", "safety_identifier": "u"})
    assert noted["choices"] == plain["choices"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_use_beam_search_matches_the_engines_beam_search(open_server, llm, path):
    from pagedllm.sampling_params import BeamSearchParams

    if path == "/v1/completions":
        body, prompt = {"prompt": PROMPT}, PROMPT
    else:
        body = {"messages": MESSAGES}
        prompt = {"prompt_token_ids": post(open_server, "/tokenize", {"messages": MESSAGES})["tokens"]}
    response = post(open_server, path, {**body, "use_beam_search": True, "n": 3, "max_tokens": 8})
    (expected,) = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=8))
    texts = [c["text"] if "text" in c else c["message"]["content"] for c in response["choices"]]
    assert texts == [s.text for s in expected.sequences]
    assert len(set(texts)) == 3  # three distinct beams, best first
    assert [c["finish_reason"] for c in response["choices"]] == [s.finish_reason for s in expected.sequences]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_match_offline(open_server, llm, path):
    chat = path == "/v1/chat/completions"
    prompt = MESSAGES if chat else PROMPT
    body = {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    response = post(open_server, path, {**body, **GREEDY, "prompt_logprobs": 2})
    got = response["prompt_logprobs"] if chat else response["choices"][0]["prompt_logprobs"]
    expected = offline(llm, prompt, **GREEDY, prompt_logprobs=2)
    assert len(got) == len(expected.prompt_token_ids) and got[0] is None
    for token_id, step, want in zip(expected.prompt_token_ids[1:], got[1:], expected.prompt_logprobs[1:]):
        assert str(token_id) in step  # the prompt's own token, plus the top 2
        assert {int(t): v["logprob"] for t, v in step.items()} == pytest.approx(
            {t: lp.logprob for t, lp in want.items()}, abs=LOGPROB_TOL)


def test_return_tokens_as_token_ids(open_server, llm):
    expected = offline(llm, PROMPT, **GREEDY, logprobs=1)
    completion = post(open_server, "/v1/completions", {"prompt": PROMPT, **GREEDY, "logprobs": 1,
                                                       "return_tokens_as_token_ids": True})
    assert completion["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in expected.outputs[0].token_ids]
    assert completion["choices"][0]["text"] == expected.outputs[0].text  # the text itself is unchanged
    chat = post(open_server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY, "logprobs": True,
                                                      "top_logprobs": 1, "return_tokens_as_token_ids": True})
    tokens = [t["token"] for t in chat["choices"][0]["logprobs"]["content"]]
    assert tokens and all(t.startswith("token_id:") and t[len("token_id:"):].isdigit() for t in tokens)


def test_truncate_prompt_tokens_keeps_the_last_tokens(open_server, llm):
    ids = llm.get_tokenizer().encode(REPEATING)
    response = post(open_server, "/v1/completions", {"prompt": REPEATING, **GREEDY, "truncate_prompt_tokens": 4})
    assert response["usage"]["prompt_tokens"] == 4
    (expected,) = llm.generate(ids[-4:], SamplingParams(**GREEDY), use_tqdm=False)
    assert response["choices"][0]["text"] == expected.outputs[0].text
    assert expected.outputs[0].text != offline(llm, REPEATING, **GREEDY).outputs[0].text


def test_request_id_names_the_response(open_server):
    response = post(open_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "request_id": "abc"})
    assert response["id"] == "chatcmpl-abc"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_chunks_carry_null_keys_and_continuous_usage(open_server, path):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    chunks = post_stream(open_server, path, {**body, **GREEDY, "ignore_eos": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    with_choices = [c for c in chunks if c["choices"]]
    for chunk in with_choices:
        choice = chunk["choices"][0]
        assert "finish_reason" in choice and "logprobs" in choice and choice["logprobs"] is None
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    done = [c["usage"]["completion_tokens"] for c in with_choices]
    assert done == sorted(done) and done[-1] == GREEDY["max_tokens"] == chunks[-1]["usage"]["completion_tokens"]
    plain = post_stream(open_server, path, {**body, **GREEDY})
    assert all("usage" not in c for c in plain)  # without stream_options no usage key at all


def test_continue_final_message_and_add_generation_prompt(open_server):
    messages = [{"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "Paris is in"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True}
    ids = post(open_server, "/tokenize", {"messages": messages, **fields})["tokens"]
    chat = post(open_server, "/v1/chat/completions", {"messages": messages, **GREEDY, **fields})
    completion = post(open_server, "/v1/completions", {"prompt": ids, **GREEDY})
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    fresh = post(open_server, "/v1/chat/completions", {"messages": messages, **GREEDY})  # a new assistant turn
    assert fresh["usage"]["prompt_tokens"] != chat["usage"]["prompt_tokens"]
    echoed = post(open_server, "/v1/chat/completions", {"messages": messages, **GREEDY, **fields, "echo": True})
    assert echoed["choices"][0]["message"]["content"] == "Paris is in" + completion["choices"][0]["text"]


def test_request_chat_template_and_kwargs(tools_server):
    template = "{{ prefix }}{% for m in messages %}{{ m.content }}{% endfor %}"
    chat = post(tools_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": PROMPT}], **GREEDY, "chat_template": template,
        "chat_template_kwargs": {"prefix": "Q: "}})
    completion = post(tools_server, "/v1/completions", {"prompt": "Q: " + PROMPT, **GREEDY})
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    broken = _post_raw(tools_server, "/v1/chat/completions", {"messages": MESSAGES, "chat_template": "{% for %}"})
    _assert_400(broken, "chat_template", "could not render")


@pytest.mark.parametrize(("path", "fields", "param"), [
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 6}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
])
def test_max_logprobs_bounds_every_logprobs_field(tools_server, path, fields, param):
    _assert_400(_post_raw(tools_server, path, {**fields, "max_tokens": 2}), param, "--max-logprobs")
    ok = {k: (5 if v == 6 else v) for k, v in fields.items()}
    assert _post_raw(tools_server, path, {**ok, "max_tokens": 2}).status_code == 200

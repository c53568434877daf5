"""Every request field, sent through the real server, does what the same SamplingParams do offline.

A table per endpoint: each row is the request fields, the SamplingParams they must become (when the
names differ), and a baseline the field must change the output from (so a field that is dropped or
routed to the wrong parameter fails, e.g. presence and frequency penalties swapped). The server's
choices (text, finish_reason, stop_reason, logprob values, usage) must equal what `LLM.generate` /
`LLM.chat` return for the same SamplingParams. One server for the session, one offline LLM.
"""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams
from pagedllm.outputs import RequestOutput
from tests.reference import offline_llm
from tests.server.sse import post

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

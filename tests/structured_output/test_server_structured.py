"""Constrained decoding and token constraints against the real server, through the official openai client.

Every JSON schema below is bounded (short strings, few items, bounded numbers) so a greedy answer
always closes within max_tokens; the test then holds the server to its promise: each response
parses and validates against its schema, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server.launch import running_server

S = {"type": "string", "maxLength": 12}
I = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"size": {"enum": [1, 2, 3]}, "unit": {"const": "cm"}},
     "required": ["size", "unit"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"nums": {"type": "array", "items": I, "maxItems": 4}}, "required": ["nums"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": I, "y": I},
                                                "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": S, "address": {"type": "object", "properties": {"city": S, "zip": I}, "required": ["city"]}},
        "required": ["name", "address"]}}, "required": ["user"]},
    {"type": "object", "properties": {"a": S, "b": I, "c": {"type": "boolean"}}, "required": ["a"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
     "required": ["title", "year"], "additionalProperties": False},
    {"type": "array", "items": I, "minItems": 2, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    {"type": "string", "maxLength": 10},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "boolean"},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
     "required": ["v"]},
    {"type": "object", "properties": {"v": {"anyOf": [I, {"type": "boolean"}]}}, "required": ["v"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": I, "y": I}, "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
     "required": ["start", "end"]},
    {"definitions": {"tag": {"type": "string", "enum": ["x", "y"]}}, "type": "object",
     "properties": {"tags": {"type": "array", "items": {"$ref": "#/definitions/tag"}, "maxItems": 2}},
     "required": ["tags"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": I, "name": S}, "required": ["id", "name"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": I, "maxItems": 2}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -1, "maximum": 1},
                                      "label": {"enum": ["pos", "neg"]}}, "required": ["score", "label"]},
    {"type": "object", "properties": {"first": S, "last": S, "middle": S}, "required": ["first", "last"]},
    {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": I}, "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "dog"}}, "required": ["kind"]}]}}, "required": ["pet"]},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {"k": S},
                                               "additionalProperties": False}}, "required": ["meta"]},
    {"type": "object", "properties": {"day": {"enum": ["mon", "tue", "wed"]}, "hours": {
        "type": "integer", "minimum": 0, "maximum": 24}, "remote": {"type": "boolean"}},
     "required": ["day", "hours", "remote"]},
    {"type": "null"},
    {"type": "object", "properties": {"q": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
     "required": ["q"]},
]

MAX_TOKENS = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("structured_server") / "server.log"
    with running_server(log, "--max-model-len", "1024") as base:
        yield base


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def _messages(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply in JSON matching this schema: {json.dumps(schema)}"}]


async def _chat_json(aclient: openai.AsyncOpenAI, model: str, i: int, schema: dict,
                     stream: bool) -> tuple[int, str, str]:
    # Alternate the three ways of asking for a schema: response_format, structured_outputs and guided_json.
    kwargs: dict = {"model": model, "messages": _messages(schema), "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if i % 3 == 0:
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
    elif i % 3 == 1:
        kwargs["extra_body"] = {"structured_outputs": {"json": schema}}
    else:
        kwargs["extra_body"] = {"guided_json": schema}
    if not stream:
        resp = await aclient.chat.completions.create(**kwargs)
        return i, resp.choices[0].message.content, resp.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await aclient.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return i, text, finish


def test_json_schemas_validate_streamed_and_not(server: str) -> None:
    """All schemas at once (one batch), each once whole and once streamed."""
    async def run() -> list[tuple[int, str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0,
                                      timeout=300) as aclient:
            model = (await aclient.models.list()).data[0].id
            return await asyncio.gather(*(_chat_json(aclient, model, i, schema, stream=bool(i % 2))
                                          for i, schema in enumerate(SCHEMAS)))

    assert len(SCHEMAS) >= 30
    for i, text, finish in asyncio.run(run()):
        assert finish == "stop", f"schema {i}: {finish}: {text!r}"
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_regex_and_choice_hold_on_both_endpoints(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    pattern = r"[a-z]{3,6}-\d{2}"
    comp = client.completions.create(model=model, prompt="A code:", max_tokens=20, temperature=1.0, n=3, seed=7,
                                     extra_body={"guided_regex": pattern})
    assert len(comp.choices) == 3
    assert all(re.fullmatch(pattern, c.text) and c.finish_reason == "stop" for c in comp.choices), comp.choices
    choices = ["sunny", "rainy", "cloudy with a chance of rain"]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                          max_tokens=20, temperature=1.0, n=4, seed=3,
                                          extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices for c in chat.choices), chat.choices
    stream = client.completions.create(model=model, prompt="Pick:", max_tokens=20, stream=True,
                                       extra_body={"guided_choice": ["alpha", "beta"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("alpha", "beta")


def test_grammar_json_object_and_stop_string(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    grammar = 'root ::= "The answer is " digit digit "."\ndigit ::= [0-9]'
    out = client.completions.create(model=model, prompt="Q:", max_tokens=20, temperature=0.0,
                                    extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The answer is \d\d\.", out.choices[0].text), out.choices[0].text
    # A stop string ends a constrained request like any other.
    stopped = client.completions.create(model=model, prompt="Q:", max_tokens=20, temperature=0.0, stop=[" is"],
                                        extra_body={"guided_grammar": grammar})
    assert stopped.choices[0].text == "The answer" and stopped.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object:"}],
                                         max_tokens=40, temperature=0.0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert obj.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "response_format.json_schema.schema cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "parenthesis"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"guided_json": {"$ref": "#/nowhere"}}, "guided_json", "guided_json cannot be compiled"),
    ({"guided_regex": "a{2,1}"}, "guided_regex", "guided_regex cannot be compiled"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "guided_grammar cannot be compiled"),
    ({"guided_choice": []}, "guided_choice", "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one output constraint"),
    ({"logit_bias": {"5": 500}}, "logit_bias", r"\[-100, 100\]"),
    ({"logit_bias": {"word": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
    ({"allowed_token_ids": [999999]}, "allowed_token_ids", "outside the vocabulary"),
    ({"bad_words": [""]}, "bad_words", "bad_words"),
])
def test_bad_constraints_are_400_naming_the_field(server: str, body: dict, param: str, message: str) -> None:
    for path, extra in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("completions", {"prompt": "hi"})):
        r = httpx.post(f"{server}/v1/{path}", json={**extra, "max_tokens": 4, **body}, timeout=60)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["param"] == param and re.search(message, error["message"]), (path, error)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.config import ModelConfig
    from pagedllm.loader.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(None))


def test_logit_bias_allowed_token_ids_and_bad_words_change_output(client: openai.OpenAI, tokenizer) -> None:
    model = client.models.list().data[0].id
    prompt = "The capital of France is"

    def complete(max_tokens: int = 8, temperature: float = 0.0, **kwargs: object) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=1,
                                         temperature=temperature, **kwargs).choices[0].text

    plain = complete()
    (yes,) = tokenizer.encode(" yes", add_special_tokens=False)
    (no,) = tokenizer.encode(" no", add_special_tokens=False)
    # +100 makes greedy decoding pick that token every time; -100 removes the greedy answer's first token.
    assert complete(4, logit_bias={str(yes): 100}) == " yes" * 4
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = complete(logit_bias={str(first): -100})
    assert banned != plain and not banned.startswith(tokenizer.decode([first]))
    # allowed_token_ids: nothing else can be sampled, even at temperature 1.
    only = complete(6, 1.0, extra_body={"allowed_token_ids": [yes, no]})
    assert re.fullmatch(r"( yes| no){6}", only), only
    # bad_words: the greedy answer's first word never appears.
    word = plain.split()[0]
    without = complete(extra_body={"bad_words": [word]})
    assert word not in without and without != plain

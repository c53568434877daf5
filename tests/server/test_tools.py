"""Tool calling: the parsers and the required/named schema on crafted outputs (fast), then the real server.

End to end, the default model (SmolLM2-135M) does call a tool on its own when the history shows it
how (two worked examples, greedy): that gives a real ``auto`` round trip (call -> tool message ->
answer) through the official ``openai`` client, whole and streamed. ``required`` and named choices
are forced by constrained decoding (a JSON schema of the calls, structured_output/).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from pagedllm.engine.chat_utils import render_chat
from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.chat import ChatToolCalls
from pagedllm.server.tool_parsers.schema import parse_constrained, tool_choice_params, tool_choice_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
NO_PARAMS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME]


# ---- parsers on crafted outputs -------------------------------------------------------
@pytest.mark.parametrize(("text", "content", "calls"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    # SmolLM2's own prompt asks for a list inside one block
    ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", '
     '"arguments": {"zone": "UTC"}}]</tool_call>', None,
     [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]),
    # stopped on EOS before the closing tag, JSON whole
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
    ('<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>', None,
     [("get_time", {"zone": "UTC"})]),  # arguments already encoded
    ("The weather is fine.", "The weather is fine.", []),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # cut JSON: content, not a call
     '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
])
def test_hermes_extracts(text, content, calls):
    result = get_tool_parser("hermes").extract(text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", '
     '"arguments": {"city": "Rome"}}', None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})]),
    ("Paris is sunny.", "Paris is sunny.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but not a call
    ('{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"city": "Par', []),
])
def test_llama3_json_extracts(text, content, calls):
    result = get_tool_parser("llama3_json").extract(text)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("nope")


def _stream_pieces(reader, pieces):
    text, content, deltas = "", "", []
    for i, piece in enumerate(pieces):
        text += piece
        c, d = reader.feed(text, i == len(pieces) - 1)
        content += c
        deltas.append(d)
    return content, deltas


def test_auto_stream_sends_content_until_a_call_may_start():
    reader = ChatToolCalls("auto", get_tool_parser("hermes")).stream()
    pieces = ["Sure", ", checking.", "\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Rome"}}',
              "\n</tool_call>"]
    text = ""
    sent = []
    for piece in pieces[:-1]:
        text += piece
        sent.append(reader.feed(text, False))
    assert "".join(c for c, _ in sent) == "Sure, checking.\n"  # "<tool" was held back, nothing after it sent
    assert all(d == [] for _, d in sent)
    content, calls = reader.feed(text + pieces[-1], True)
    assert content == ""
    (call,) = calls
    assert (call.index, call.type, call.function.name) == (0, "function", "get_weather")
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"city": "Rome"}
    assert reader.made_calls


def test_auto_stream_of_plain_text_is_all_content():
    reader = ChatToolCalls("auto", get_tool_parser("hermes")).stream()
    content, deltas = _stream_pieces(reader, ["It is", " <tool", "s> fine", "."])
    assert content == "It is <tools> fine." and all(d == [] for d in deltas)
    assert not reader.made_calls


def test_named_stream_sends_the_header_then_the_arguments():
    choice = {"type": "function", "function": {"name": "get_time"}}
    reader = ChatToolCalls(choice, None).stream()
    _, deltas = _stream_pieces(reader, ['{"zone"', ': "UTC"', "}"])
    flat = [d for step in deltas for d in step]
    assert flat[0].id.startswith("call_") and flat[0].function.name == "get_time" and flat[0].function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in flat[1:])
    assert json.loads("".join(d.function.arguments for d in flat)) == {"zone": "UTC"}


def test_finish_reason_is_tool_calls_only_when_the_model_chose_to_call():
    auto = ChatToolCalls("auto", get_tool_parser("hermes"))
    assert auto.finish_reason("stop", True) == "tool_calls"
    assert auto.finish_reason("stop", False) == "stop"
    assert auto.finish_reason("length", True) == "length"
    named = ChatToolCalls({"type": "function", "function": {"name": "get_time"}}, None)
    assert named.finish_reason("stop", True) == "stop"  # OpenAI: a forced call ends with stop


# ---- the schema for required / named --------------------------------------------------------
def _valid(schema, instance) -> bool:
    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError:
        return False
    return True


def test_required_schema_accepts_calls_of_the_tools_only():
    schema = tool_choice_schema(TOOLS + [NO_PARAMS], "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert _valid(schema, [{"name": "get_weather", "parameters": {"city": "Paris"}}])
    assert _valid(schema, [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}},
                           {"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "ping", "parameters": {}}])
    assert not _valid(schema, [])  # required: at least one call
    assert not _valid(schema, [{"name": "get_stock", "parameters": {}}])  # not a tool
    assert not _valid(schema, [{"name": "get_weather", "parameters": {}}])  # city missing
    assert not _valid(schema, [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "K"}}])
    assert not _valid(schema, [{"name": "get_time", "parameters": {"city": "Paris"}}])  # another tool's arguments
    assert not _valid(schema, [{"name": "get_time"}])


def test_parallel_tool_calls_false_allows_one_call():
    schema = tool_choice_schema(TOOLS, "required", parallel_tool_calls=False)
    assert _valid(schema, [{"name": "get_time", "parameters": {"zone": "UTC"}}])
    assert not _valid(schema, [{"name": "get_time", "parameters": {"zone": "UTC"}},
                               {"name": "get_time", "parameters": {"zone": "CET"}}])


def test_named_schema_is_the_functions_parameters():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    schema = tool_choice_schema(TOOLS, choice)
    assert schema == WEATHER["function"]["parameters"]
    assert _valid(schema, {"city": "Rome"}) and not _valid(schema, {"zone": "UTC"})
    assert tool_choice_schema([NO_PARAMS], {"type": "function", "function": {"name": "ping"}}) == {
        "type": "object", "properties": {}}
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, "none") is None


def test_constrained_output_parses_back_to_calls():
    calls = parse_constrained('[{"name": "get_time", "parameters": {"zone": "UTC"}}]', "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    named = parse_constrained('{"city": "Rome"}', {"type": "function", "function": {"name": "get_weather"}})
    assert [(c.name, json.loads(c.arguments)) for c in named] == [("get_weather", {"city": "Rome"})]
    assert parse_constrained('[{"name": "get_time", "parameters": {"zo', "required") is None


def test_tool_choice_params_carry_the_schema():
    params = tool_choice_params(TOOLS, "required")
    assert params.json == tool_choice_schema(TOOLS, "required")
    assert tool_choice_params(TOOLS, "auto") is None and tool_choice_params(None, "required") is None


# ---- rendering --------------------------------------------------------------------------------
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def test_a_template_without_tools_gets_them_the_hermes_way(smollm2_tokenizer):
    text = render_chat(smollm2_tokenizer, HISTORY, tools=[WEATHER])
    tools_line = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(tools_line) == WEATHER
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_that_knows_tools_gets_them_natively(smollm2_tokenizer):
    template = ("{% for t in tools %}TOOL {{ t.function.name }}|{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
                "{% endfor %}{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}|{% endfor %}")
    text = render_chat(smollm2_tokenizer, HISTORY, tools=[WEATHER], chat_template=template,
                       add_generation_prompt=False)
    assert text == "TOOL get_weather|user: Weather in Paris?|assistant: CALL get_weather Paris|tool: sunny (for c1)|"


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]}],
     r"messages\[0\]\.tool_calls\[0\]"),
    ([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "user", "content": "x", "tool_calls": []}], r"messages\[0\]\.tool_calls"),
])
def test_bad_tool_history_is_a_value_error_naming_the_field(smollm2_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(smollm2_tokenizer, messages)


# ---- the real server ------------------------------------------------------------------------------
MODEL = "SmolLM2-135M-Instruct"


def _example(city: str, call_id: str, result: str, answer: str) -> list[dict]:
    arguments = json.dumps({"city": city})
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [{"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer}]


# Two worked examples: with them the 135M model calls get_weather for the third city on its own (greedy).
FEW_SHOT = (_example("London", "c1", "rainy, 12C", "It is rainy and 12C in London.")
            + _example("Berlin", "c2", "sunny, 20C", "It is sunny and 20C in Berlin.")
            + [{"role": "user", "content": "What is the weather in Rome?"}])


@pytest.fixture(scope="module")
def client(tools_server):
    from openai import OpenAI

    return OpenAI(base_url=tools_server + "/v1", api_key="unused", max_retries=0)


def _ask(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_auto_round_trip_call_tool_message_answer(client):
    first = _ask(client, FEW_SHOT, tools=[WEATHER, TIME])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    history = FEW_SHOT + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "cloudy, 18C"}]
    answer = _ask(client, history, tools=[WEATHER, TIME]).choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "18" in answer.message.content and "cloudy" in answer.message.content  # it read the tool's result


def test_auto_streamed_call_is_one_delta_of_openai_shape(client):
    chunks = list(_ask(client, FEW_SHOT, tools=[WEATHER, TIME], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert not "".join(d.content or "" for d in deltas)  # nothing of the <tool_call> block leaked as content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_none_renders_no_tools_and_parses_nothing(client, tools_server):
    reply = _ask(client, FEW_SHOT, tools=[WEATHER], tool_choice="none").choices[0]
    assert reply.message.tool_calls is None and reply.finish_reason != "tool_calls"
    assert "<tool_call>" in reply.message.content  # the model still writes one; with "none" it stays text


def test_auto_needs_the_server_flag(open_server):
    body = {"messages": FEW_SHOT, "tools": [WEATHER], "max_tokens": 4}
    for extra in ({}, {"tool_choice": "auto"}):
        r = httpx.post(open_server + "/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param", "match"), [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "distinct"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools", ""),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages", "not valid JSON"),
])
def test_bad_tool_requests_are_400_naming_the_field(tools_server, body, param, match):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(tools_server + "/v1/chat/completions", json=request, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and match in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_choice_round_trip(client, choice, stream):
    """The call is grammar-forced even where the model would not make it."""
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    kwargs = dict(tools=[WEATHER, TIME], tool_choice=choice, max_tokens=64)
    if stream:
        chunks = list(_ask(client, messages, stream=True, **kwargs))
        calls: dict[int, dict] = {}
        for c in chunks:
            for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                entry["arguments"] += tc.function.arguments or ""
        made = [(c["id"], c["name"], c["arguments"]) for c in calls.values()]
    else:
        message = _ask(client, messages, **kwargs).choices[0].message
        made = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    assert made and all(name in ("get_weather", "get_time") for _, name, _ in made)
    if isinstance(choice, dict):
        assert [name for _, name, _ in made] == ["get_time"]
    for _, name, arguments in made:
        schema = (WEATHER if name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(json.loads(arguments), schema)
    call_id, name, arguments = made[0]
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "10:30"}]
    answer = _ask(client, history, tools=[WEATHER, TIME], tool_choice="none").choices[0]
    assert answer.message.content and answer.message.tool_calls is None


# ---- langchain-openai against the server --------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tools_server):
    from langchain_openai import ChatOpenAI  # a test dependency (pyproject's test extras)

    return ChatOpenAI(base_url=tools_server + "/v1", api_key="unused", model=MODEL,
                                       temperature=0, max_tokens=48, max_retries=0)


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import ToolMessage
    from langchain_core.messages.utils import convert_to_messages

    model = chat_model.bind_tools([WEATHER, TIME])
    history = convert_to_messages(FEW_SHOT)
    reply = model.invoke(history)
    (call,) = reply.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Rome"})
    answer = model.invoke(history + [reply, ToolMessage("cloudy, 18C", tool_call_id=call["id"])])
    assert not answer.tool_calls and "18" in answer.content


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    """Needs constrained decoding: json_schema goes through response_format, function_calling through a named
    tool_choice."""
    schema = {"title": "City", "description": "A city and its country", "type": "object",
              "properties": {"city": {"type": "string", "maxLength": 12},  # fits the model's 48 tokens
                             "country": {"type": "string", "maxLength": 12}},
              "required": ["city", "country"]}
    result = chat_model.with_structured_output(schema, method=method).invoke("Name a city in Italy.")
    jsonschema.validate(result, schema)

"""How the server's request fields become SamplingParams (no server: the pydantic models and the mapping)."""

from __future__ import annotations

import pytest

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.server.serving_engine import OpenAIError, with_constraints

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _params(body: dict, cls: type = ChatCompletionRequest) -> SamplingParams:
    base = {"messages": [{"role": "user", "content": "x"}]} if cls is ChatCompletionRequest else {"prompt": "x"}
    request = cls.model_validate({**base, **body})
    return with_constraints(request, request.to_sampling_params(8))


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputsParams(regex="a+")),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
    ({"guided_choice": ["x", "y"]}, StructuredOutputsParams(choice=["x", "y"])),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputsParams(grammar='root ::= "a"')),
])
@pytest.mark.parametrize("cls", [ChatCompletionRequest, CompletionRequest])
def test_each_way_of_asking_maps_to_one_spec(body: dict, expected: StructuredOutputsParams, cls: type) -> None:
    params = _params(body, cls)
    assert params.structured_outputs == expected
    assert params.max_tokens == 8  # the other fields survive the mapping


def test_text_format_and_no_fields_leave_params_unconstrained() -> None:
    assert _params({"response_format": {"type": "text"}}).structured_outputs is None
    plain = _params({})
    assert plain.structured_outputs is None and plain.logit_bias is None and plain.bad_words is None


def test_token_constraint_fields() -> None:
    params = _params({"logit_bias": {"5": 10, "7": -100.0}, "allowed_token_ids": [1, 2], "bad_words": ["no"]},
                     CompletionRequest)
    assert params.logit_bias == {5: 10, 7: -100.0}
    assert params.allowed_token_ids == [1, 2] and params.bad_words == ["no"]


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex"),
    ({"guided_json": SCHEMA, "use_beam_search": True}, "use_beam_search"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, "structured_outputs"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
])
def test_conflicts_and_bad_values_are_400(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as err:
        _params(body)
    assert err.value.status == 400 and err.value.param == param

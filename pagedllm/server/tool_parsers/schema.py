"""``tool_choice: "required"`` or a named function -> the JSON schema the output is decoded under.

The grammar engine (``StructuredOutputsParams`` in ``sampling_params``, built by the
structured-outputs work) enforces the schema; this module only builds it and reads the
result back, as vLLM does:

    required   -> [{"name": <one of the tools>, "parameters": {...that tool's schema}}, ...]
                  (minItems 1; maxItems 1 when parallel_tool_calls is false)
    named f    -> f's parameters object itself (the output *is* the arguments)
"""

from __future__ import annotations

import json
from typing import Any

from pagedllm.server.tool_parsers.base import ParsedToolCall, calls_from_json

# A function declared without parameters takes an object (OpenAI's default).
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def tool_choice_schema(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any],
                       parallel_tool_calls: bool = True) -> dict[str, Any] | None:
    """The JSON schema for ``required`` or a named choice; None for ``none`` / ``auto`` (unconstrained)."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)  # checked by the request model
        return tool_parameters(tool)
    if tool_choice != "required":
        return None
    variants = [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": tool_parameters(t)},
                 "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def tool_choice_params(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                       parallel_tool_calls: bool = True) -> Any:
    """``StructuredOutputsParams(json=schema)`` for ``required`` / named (the grammar forces the call), None
    otherwise."""
    from pagedllm.sampling_params import StructuredOutputsParams

    if not tools or tool_choice is None:
        return None
    schema = tool_choice_schema(tools, tool_choice, parallel_tool_calls)
    if schema is None:
        return None
    return StructuredOutputsParams(json=schema)


def parse_constrained(text: str, tool_choice: str | dict[str, Any]) -> list[ParsedToolCall] | None:
    """The calls in output decoded under ``tool_choice_schema``; None if it is not valid JSON of that shape
    (a reply cut short by max_tokens)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(tool_choice, dict):
        if not isinstance(obj, dict):
            return None
        return [ParsedToolCall(tool_choice["function"]["name"], json.dumps(obj, ensure_ascii=False))]
    return calls_from_json(obj) if isinstance(obj, list) else None

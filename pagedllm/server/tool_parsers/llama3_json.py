"""Llama 3.x JSON calls: the whole output is ``{"name": ..., "parameters": {...}}`` (several joined by ``;``).

Llama 3.1/3.2's template asks for a bare JSON object, optionally after ``<|python_tag|>``.
Output that does not start with ``{`` (after the tag and whitespace) is plain content, so
a text reply streams as usual; one that starts with ``{`` is held until the end.
"""

from __future__ import annotations

import json

from pagedllm.server.tool_parsers.base import ExtractedToolCalls, ParsedToolCall, ToolParser, calls_from_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return ExtractedToolCalls(text)
        calls: list[ParsedToolCall] = []
        decoder, pos = json.JSONDecoder(), 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text)
            parsed = calls_from_json(obj)
            if parsed is None:
                return ExtractedToolCalls(text)
            calls.extend(parsed)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":  # calls are separated by ";"
                pos += 1
        return ExtractedToolCalls(None, calls)

    def hold_from(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped:
            return 0  # only whitespace so far: a call may still follow
        rest = stripped.removeprefix(PYTHON_TAG).lstrip() if stripped.startswith(PYTHON_TAG) else stripped
        if rest.startswith("{") or (not rest and stripped.startswith(PYTHON_TAG)) or PYTHON_TAG.startswith(stripped):
            return 0
        return len(text)

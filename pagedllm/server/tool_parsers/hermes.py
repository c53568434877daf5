"""Hermes-style calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call.

Used by Hermes, Qwen2.5/3 and SmolLM2 (whose tool prompt asks for a JSON list inside one
block; both shapes are read). A block the model left unclosed at the end of its output
(it stopped on EOS right after the JSON) still counts when its JSON is whole.
"""

from __future__ import annotations

import json
import re

from pagedllm.server.tool_parsers.base import (
    ExtractedToolCalls,
    ToolParser,
    calls_from_json,
    partial_prefix_start,
)

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(START)
        if start < 0:
            return ExtractedToolCalls(text)
        calls = []
        for block in _BLOCK.findall(text[start:]):
            try:
                parsed = calls_from_json(json.loads(block.strip()))
            except json.JSONDecodeError:
                parsed = None
            if parsed is None:  # not a call after all: the whole text is content
                return ExtractedToolCalls(text)
            calls.extend(parsed)
        content = text[:start].strip()
        return ExtractedToolCalls(content or None, calls)

    def hold_from(self, text: str) -> int:
        start = text.find(START)
        return start if start >= 0 else partial_prefix_start(text, START)

"""The tool parser interface and the JSON helpers its implementations share."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends arguments as a string)


@dataclass
class ExtractedToolCalls:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ParsedToolCall] = field(default_factory=list)


class ToolParser(ABC):
    """Splits a model's finished output into content and tool calls.

    ``hold_from`` serves streaming: the index from which the text may be (the start of)
    a tool call, so content before it can be sent while the rest waits for the end.
    """

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls: ...

    @abstractmethod
    def hold_from(self, text: str) -> int:
        """Index of the first character that may belong to a tool call (``len(text)`` if none can)."""


def call_from_json(obj: Any) -> ParsedToolCall | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` -> a call; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments already encoded
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def calls_from_json(obj: Any) -> list[ParsedToolCall] | None:
    """One call object or a list of them -> calls; None if any item is not a call."""
    items = obj if isinstance(obj, list) else [obj]
    calls = [call_from_json(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def partial_prefix_start(text: str, marker: str) -> int:
    """Where a suffix of ``text`` that is a proper prefix of ``marker`` starts (``len(text)`` if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)

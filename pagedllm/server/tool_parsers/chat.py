"""One chat request's reply text -> ``content`` and ``tool_calls``, whole or as stream deltas.

    tool_choice   how the text is read                                  streamed
    none / no tools  all content                                           as generated
    auto          the --tool-call-parser's format (hermes, llama3_json)    content until a call may start,
                                                                           the calls when the reply ends
    required      a JSON list of {"name", "parameters"} (schema.py)        the calls when the reply ends
    named f       the JSON arguments of f                                  the call's header first, then
                                                                           the arguments as they come

Streamed calls follow OpenAI's deltas: ``tool_calls: [{"index", "id", "type", "function":
{"name", "arguments"}}]``, later deltas of a call carrying only ``index`` and more ``arguments``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pagedllm.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from pagedllm.server.tool_parsers.base import ParsedToolCall, ToolParser
from pagedllm.server.tool_parsers.schema import parse_constrained


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatToolCalls:
    """How one request's replies are read; ``parser`` is needed for ``auto`` only."""

    def __init__(self, tool_choice: str | dict[str, Any] | None, parser: ToolParser | None) -> None:
        self.tool_choice = tool_choice
        self.parser = parser
        if isinstance(tool_choice, dict):
            self.mode = "named"
        elif tool_choice in ("auto", "required"):
            self.mode = tool_choice
        else:
            self.mode = "none"
        if self.mode == "auto" and parser is None:
            raise ValueError("tool_choice \"auto\" needs a tool call parser")

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, calls) of a finished reply."""
        if self.mode == "auto":
            result = self.parser.extract(text)  # type: ignore[union-attr]
            return result.content, result.calls
        if self.mode == "required":
            calls = parse_constrained(text, "required")
            return (None, calls) if calls else (text, [])
        if self.mode == "named":  # the text is the arguments, whole or (cut by max_tokens) not
            return None, [ParsedToolCall(self.tool_choice["function"]["name"], text)]  # type: ignore[index]
        return text, []

    def message_fields(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        content, calls = self.extract(text)
        if not calls:
            return content, None
        return content, [ToolCall(id=tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                         for c in calls]

    def finish_reason(self, reason: str | None, made_calls: bool) -> str | None:
        """OpenAI answers ``tool_calls`` when the model chose to call (auto, required), ``stop`` for a forced
        named call."""
        if made_calls and reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """One choice's stream: ``feed`` the cumulative text, get (content delta, tool-call deltas)."""

    def __init__(self, calls: ChatToolCalls) -> None:
        self.calls = calls
        self.sent = 0  # characters of the text already sent (as content, or as named arguments)
        self.named_id: str | None = None
        self.made_calls = False

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        mode = self.calls.mode
        if mode == "none":
            return self._advance(text, len(text)), []
        if mode == "named":
            return "", self._named(text)
        if not finished:
            hold = self.calls.parser.hold_from(text) if mode == "auto" else 0  # required: all held
            return self._advance(text, hold), []
        content, parsed = self.calls.extract(text)
        if not parsed:
            return self._advance(text, len(text)), []
        self.made_calls = True
        start = self.calls.parser.hold_from(text) if mode == "auto" else 0
        head = self._advance(text, start) if content else ""
        deltas = [DeltaToolCall(index=i, id=tool_call_id(), type="function",
                                function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                  for i, c in enumerate(parsed)]
        return head, deltas

    def _advance(self, text: str, upto: int) -> str:
        out = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def _named(self, text: str) -> list[DeltaToolCall]:
        deltas = []
        if self.named_id is None:
            self.named_id, self.made_calls = tool_call_id(), True
            name = self.calls.tool_choice["function"]["name"]  # type: ignore[index]
            deltas.append(DeltaToolCall(index=0, id=self.named_id, type="function",
                                        function=DeltaFunctionCall(name=name, arguments="")))
        more = self._advance(text, len(text))
        if more:
            deltas.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=more)))
        return deltas

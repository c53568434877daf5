"""Tool-call parsers: the model's text -> OpenAI ``tool_calls``, chosen once by ``--tool-call-parser``.

A parser reads what a model writes when it calls a tool in its own format (``hermes``:
``<tool_call>{...}</tool_call>``, ``llama3_json``: a bare JSON object) and splits it into
the plain content before the call and the calls themselves. Used for ``tool_choice: "auto"``;
``required`` and named choices are decoded under a JSON schema instead (``schema.py``), so
their output is parsed without a model-specific format.

    get_tool_parser("hermes").extract(text) -> ExtractedToolCalls(content, calls)
"""

from __future__ import annotations

from collections.abc import Callable

from pagedllm.server.tool_parsers.base import ExtractedToolCalls, ParsedToolCall, ToolParser
from pagedllm.server.tool_parsers.hermes import HermesToolParser
from pagedllm.server.tool_parsers.llama3_json import Llama3JsonToolParser

__all__ = ["ExtractedToolCalls", "ParsedToolCall", "ToolParser", "TOOL_PARSERS", "get_tool_parser"]

# Name (as given to --tool-call-parser) -> factory. The default model (SmolLM2) calls tools the hermes way.
TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ValueError naming the choices for an unknown one."""
    factory = TOOL_PARSERS.get(name)
    if factory is None:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}")
    return factory()

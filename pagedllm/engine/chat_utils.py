"""Chat messages (and tools) -> prompt token ids, through the tokenizer's chat template.

Shared by the server's /v1/chat/completions, /tokenize and ``LLM.chat``. Messages
are validated here (a bad message is a ``ValueError`` naming the field, so the
server answers 400), then rendered to text and encoded without adding special
tokens again: the template already wrote them. Rendering to text first also
sidesteps ``apply_chat_template(tokenize=True)`` returning a list in
transformers 4 and a ``BatchEncoding`` in transformers 5.

Tools: a template that knows them (it mentions ``tools`` / ``tool_calls``) gets them
as transformers passes them (``tools=``, assistant ``tool_calls`` with arguments as
objects). A template that does not (the default SmolLM2's) would drop them silently,
so they are written into the conversation the Hermes way instead: the tool list in
the system message, calls as ``<tool_call>`` blocks, results as ``<tool_response>``
blocks; the ``hermes`` tool parser reads the model's calls back.
"""

from __future__ import annotations

import json
from typing import Any

VALID_ROLES = ("system", "developer", "user", "assistant", "tool")
# apply_chat_template's own arguments: chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                                      "truncation", "max_length", "return_tensors", "return_dict",
                                      "return_assistant_tokens_mask", "tokenizer_kwargs"})

HERMES_TOOLS_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "The functions you may call are given in <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def _message_text(index: int, message: Any) -> str:
    """Validate one message and return its content as a plain string."""
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in VALID_ROLES:
        raise ValueError(f"messages[{index}].role must be one of {', '.join(VALID_ROLES)}, got {role!r}")
    content = message.get("content")
    if content is None and role == "assistant":  # an assistant turn may carry only tool calls
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content[{j}] must be {{\"type\": \"text\", \"text\": <string>}}"
                                 " (only text content is supported)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def _tool_calls(index: int, message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, validated, with arguments decoded to objects."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise ValueError(f"messages[{index}].tool_calls must be a list, on an assistant message")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ValueError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": "
                             "{\"name\": <string>, \"arguments\": <JSON string>}}")
        try:
            arguments = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            raise ValueError(f"{where}.function.arguments is not valid JSON") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _conversation(messages: list[dict[str, Any]], native_tools: bool) -> list[dict[str, Any]]:
    conversation = []
    for i, message in enumerate(messages):
        text = _message_text(i, message)  # validates the role too
        calls = _tool_calls(i, message)
        entry: dict[str, Any] = {"role": message["role"], "content": text}
        if native_tools:
            if calls:
                entry["tool_calls"] = calls
            if message["role"] == "tool" and isinstance(message.get("tool_call_id"), str):
                entry["tool_call_id"] = message["tool_call_id"]
        else:
            blocks = [f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>" for c in calls]
            if blocks:
                entry["content"] = "\n".join(([text] if text else []) + blocks)
            if message["role"] == "tool":
                entry["content"] = f"<tool_response>\n{text}\n</tool_response>"
        conversation.append(entry)
    return conversation


def _with_tools_prompt(conversation: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Hermes tool prompt in the system message (a new first message when there is none)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    prompt = HERMES_TOOLS_PROMPT.format(tools=listing)
    if conversation and conversation[0]["role"] in ("system", "developer"):
        first = dict(conversation[0], content=f"{conversation[0]['content']}\n\n{prompt}")
        return [first, *conversation[1:]]
    return [{"role": "system", "content": prompt}, *conversation]


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                chat_template: str | None = None, tools: list[dict[str, Any]] | None = None,
                continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                documents: list[dict[str, str]] | None = None) -> str:
    """Validate ``messages`` and render them (with ``tools``) through the chat template to the prompt text."""
    if tokenizer is None:
        raise ValueError("messages cannot be rendered: the engine runs without a tokenizer")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    kwargs = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}: use the request field")
    native_tools = "tool" in template
    conversation = _conversation(messages, native_tools)
    if tools and not native_tools:
        conversation, tools = _with_tools_prompt(conversation, tools), None
    if continue_final_message and conversation[-1]["role"] != "assistant":
        raise ValueError("continue_final_message needs an assistant message last in messages")
    # Only what is set is passed: a minimal tokenizer (tests' toy one) need not know these arguments.
    optional = {"tools": tools, "documents": documents, "continue_final_message": continue_final_message or None}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    import jinja2

    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:  # a request's own template, or a conversation the template refuses
        raise ValueError(f"chat_template could not render these messages: {e}") from None


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        chat_template: str | None = None, add_special_tokens: bool = False,
                        **render_kwargs: Any) -> list[int]:
    """Validate ``messages``, apply the chat template and return the prompt token ids
    (``render_kwargs``: ``render_chat``'s tools, continue_final_message, template_kwargs, documents)."""
    text = render_chat(tokenizer, messages, add_generation_prompt, chat_template, **render_kwargs)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)

"""Chat messages -> prompt token ids, through the tokenizer's chat template.

Shared by the server's /v1/chat/completions and ``LLM.chat``. Messages are
validated here (a bad message is a ``ValueError`` naming the field, so the
server answers 400), then rendered to text and encoded without adding special
tokens again: the template already wrote them. Rendering to text first also
sidesteps ``apply_chat_template(tokenize=True)`` returning a list in
transformers 4 and a ``BatchEncoding`` in transformers 5.
"""

from __future__ import annotations

from typing import Any

VALID_ROLES = ("system", "developer", "user", "assistant", "tool")


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


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> str:
    """Validate ``messages`` and render them with the chat template to the prompt text."""
    if tokenizer is None:
        raise ValueError("messages cannot be rendered: the engine runs without a tokenizer")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    conversation = []
    for i, message in enumerate(messages):
        text = _message_text(i, message)  # validates the role too
        conversation.append({"role": message["role"], "content": text})
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    return tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        chat_template: str | None = None) -> list[int]:
    """Validate ``messages``, apply the chat template and return the prompt token ids."""
    text = render_chat(tokenizer, messages, add_generation_prompt, chat_template)
    return tokenizer.encode(text, add_special_tokens=False)

"""POST /v1/chat/completions: messages (+ tools) -> chat template -> one engine request -> n choices.

Streaming follows OpenAI's chunk sequence: per choice a first chunk whose delta
carries the role, then content (or tool-call) deltas with logprobs of the new
tokens when asked, then one chunk with the finish_reason; an optional usage chunk
with no choices; ``data: [DONE]``. Tool calls are read from the reply by
``tool_parsers.chat.ChatToolCalls`` (the ``tool_choice`` decides how);
``use_beam_search`` runs the engine's beam search and answers once, whole.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagedllm.engine.chat_utils import apply_chat_template
from pagedllm.outputs import Logprob, RequestOutput
from pagedllm.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatLogprobToken,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from pagedllm.server.serving_engine import (
    DeltaTracker,
    OpenAIServing,
    ServingLimits,
    SSEStream,
    bad_request,
    clamp_logprob,
    collect_final,
    merge_streams,
    random_id,
    sse,
    with_constraints,
)
from pagedllm.server.tool_parsers import get_tool_parser
from pagedllm.server.tool_parsers.chat import ChatToolCalls
from pagedllm.server.tool_parsers.schema import tool_choice_params


@dataclass(frozen=True)
class ChatOptions:
    """Server flags of the chat endpoint."""

    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" is allowed
    tool_call_parser: str | None = None  # --tool-call-parser: how "auto" replies are read
    # --trust-request-chat-template: a request's own Jinja template runs only then (it could loop for ever
    # on the one tokenizer thread; the sandbox bounds what it touches, not how long it runs).
    trust_request_chat_template: bool = False


def _text_chars(content: Any) -> int:
    """Characters of a message's text: a string, or the ``text`` of its content parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _echo_text(request: ChatCompletionRequest) -> str:
    """vLLM's chat ``echo``: the reply starts with the last message when it is the assistant's own."""
    last = request.messages[-1] if request.messages else None
    if not request.echo or not isinstance(last, dict) or last.get("role") != "assistant":
        return ""
    return last.get("content") if isinstance(last.get("content"), str) else ""


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, served_model_names: list[str], limits: ServingLimits | None = None,
                 options: ChatOptions | None = None, loras: Any = None) -> None:
        super().__init__(engine, served_model_names, limits, loras)
        self.options = options or ChatOptions()
        self.tool_parser = get_tool_parser(self.options.tool_call_parser) if self.options.tool_call_parser else None

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | SSEStream:
        """Validate, render the chat, add the request, and return the response or the SSE lines."""
        deadline = self.deadline()  # a stream's deadline counts from arrival, like a whole response's
        model_name = self.check_model(request.model)
        self.check_limits(request.n, None, request.stop)
        self.check_logprobs(top_logprobs=request.top_logprobs, prompt_logprobs=request.prompt_logprobs)
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not available when streaming", "prompt_logprobs")
        tools = self._tool_calls(request)
        # The chat template only adds text, so the messages' characters alone can prove the prompt too long.
        self.check_prompt_chars(sum(_text_chars(m.get("content")) for m in request.messages), "messages")
        prompt_ids = self.truncate_prompt(await self._render(request), request.truncate_prompt_tokens)
        max_tokens = self.resolve_max_tokens(len(prompt_ids), request.requested_max_tokens)
        if request.use_beam_search:
            params: Any = with_constraints(request, request.to_beam_search_params(max_tokens))  # 400 if any
        else:
            params = with_constraints(request, request.to_sampling_params(max_tokens))  # structured outputs
            structured = tool_choice_params(request.tool_dicts, request.tool_choice_dict,
                                            request.parallel_tool_calls is not False)
            if structured is not None:
                if params.structured_outputs is not None:
                    raise bad_request("tool_choice 'required' or a named function cannot be combined with "
                                      "response_format or structured_outputs", "tool_choice")
                params.structured_outputs = structured
        request_id = f"chatcmpl-{request.request_id}" if request.request_id else random_id("chatcmpl")
        streams = await self.add_requests(request_id, [prompt_ids], [params], request.priority, request.model)
        header = dict(id=request_id, created=int(time.time()), model=model_name)
        if request.stream:
            return SSEStream(self._stream(request, len(prompt_ids), merge_streams(streams), header, tools),
                             streams, deadline)
        (final,) = await collect_final(streams)
        return self._response(request, final, tools, header)

    def _tool_calls(self, request: ChatCompletionRequest) -> ChatToolCalls:
        choice = request.tool_choice_dict if request.tools else None
        if choice == "auto" and not (self.options.enable_auto_tool_choice and self.tool_parser is not None):
            raise bad_request('tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                              '--tool-call-parser; send tool_choice "none", "required" or a named function',
                              "tool_choice")
        return ChatToolCalls(choice, self.tool_parser)

    async def _render(self, request: ChatCompletionRequest) -> list[int]:
        if request.chat_template is not None and not self.options.trust_request_chat_template:
            raise bad_request("chat_template is only accepted by a server started with "
                              "--trust-request-chat-template", "chat_template")
        add_special = bool(request.add_special_tokens)  # the template writes the special tokens itself
        return await self.engine.run_in_tokenizer_thread(
            apply_chat_template, self.tokenizer, request.messages, request.add_generation_prompt,
            request.chat_template, add_special, tools=request.tool_dicts,
            continue_final_message=request.continue_final_message, template_kwargs=request.chat_template_kwargs,
            documents=request.documents)

    def _response(self, request: ChatCompletionRequest, final: RequestOutput, tools: ChatToolCalls,
                  header: dict) -> ChatCompletionResponse:
        echo, choices = _echo_text(request), []
        for c in sorted(final.outputs, key=lambda c: c.index):
            content, calls = tools.message_fields(c.text)
            if echo:
                content = echo + (content or "")
            message = ChatMessage(role="assistant", content=content, tool_calls=calls)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                                      finish_reason=tools.finish_reason(c.finish_reason, bool(calls)),
                                      stop_reason=c.stop_reason))
        num_prompt = len(final.prompt_token_ids)
        num_generated = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            prompt_logprobs = self.prompt_logprobs_json(final)
        return ChatCompletionResponse(**header, choices=choices, usage=usage, prompt_logprobs=prompt_logprobs)

    def _logprobs(self, request: ChatCompletionRequest, token_ids: list[int],
                  steps: list[dict[int, Logprob] | None] | None) -> ChatLogProbs | None:
        """Per token: its text, logprob, UTF-8 bytes and the ``top_logprobs`` most likely tokens."""
        if not request.logprobs:
            return None
        num_top, as_id = request.top_logprobs or 0, request.return_tokens_as_token_ids
        content = []
        for token_id, step in zip(token_ids, steps or [None] * len(token_ids), strict=True):
            step = step or {}
            sampled = step.get(token_id)
            token = self.token_text(token_id, sampled, as_id)
            ranked = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            top = [self._top_logprob(t, lp, as_id) for t, lp in ranked]
            content.append(ChatLogprobToken(token=token, logprob=clamp_logprob(sampled.logprob if sampled else None),
                                            bytes=list(token.encode("utf-8")), top_logprobs=top))
        return ChatLogProbs(content=content)

    def _top_logprob(self, token_id: int, logprob: Logprob, as_id: bool) -> TopLogprob:
        token = self.token_text(token_id, logprob, as_id)
        return TopLogprob(token=token, logprob=clamp_logprob(logprob.logprob), bytes=list(token.encode("utf-8")))

    async def _stream(self, request: ChatCompletionRequest, num_prompt_tokens: int,
                      outputs: AsyncIterator[tuple[int, RequestOutput]], header: dict,
                      tools: ChatToolCalls) -> AsyncIterator[str]:
        n = request.n or 1
        tracker, readers = DeltaTracker(n), [tools.stream() for _ in range(n)]
        num_generated = [0] * n  # tokens per choice so far (usage)
        continuous = request.include_continuous_usage

        def usage() -> UsageInfo:
            done = sum(num_generated)
            return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=done,
                             total_tokens=num_prompt_tokens + done)

        for index in range(n):  # the role first, before any token exists (as OpenAI does)
            choice = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=_echo_text(request)))
            yield sse(ChatCompletionChunk(**header, choices=[choice], usage=usage() if continuous else None))
        async for _, output in outputs:
            for sample in output.outputs:
                delta = tracker.next(sample.index, sample)
                if delta is None:
                    continue
                num_generated[sample.index] = len(sample.token_ids)
                reader = readers[sample.index]
                text, calls = reader.feed(sample.text, sample.finish_reason is not None)
                if not (text or calls or sample.finish_reason or (delta.token_ids and request.logprobs)):
                    continue
                choice = ChatStreamChoice(
                    index=sample.index, delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                    logprobs=self._logprobs(request, delta.token_ids, delta.logprobs),
                    finish_reason=tools.finish_reason(sample.finish_reason, reader.made_calls),
                    stop_reason=sample.stop_reason)
                yield sse(ChatCompletionChunk(**header, choices=[choice], usage=usage() if continuous else None))
        if request.include_usage_in_stream:
            yield sse(ChatCompletionChunk(**header, choices=[], usage=usage()))

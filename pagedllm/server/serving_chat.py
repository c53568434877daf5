"""POST /v1/chat/completions: messages -> chat template -> one engine request -> n choices.

Streaming follows OpenAI's chunk sequence: per choice a first chunk whose delta
carries the role, then content deltas (the new suffix of the cumulative text,
with logprobs of the new tokens when asked), then one chunk with the
finish_reason; an optional usage chunk with no choices; ``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
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
    SSEStream,
    clamp_logprob,
    collect_final,
    merge_streams,
    random_id,
    sse,
    with_constraints,
)


def _text_chars(content: Any) -> int:
    """Characters of a message's text: a string, or the ``text`` of its content parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | SSEStream:
        """Validate, render the chat, add the request, and return the response or the SSE lines."""
        deadline = self.deadline()  # a stream's deadline counts from arrival, like a whole response's
        model_name = self.check_model(request.model)
        self.check_limits(request.n, None, request.stop)
        # The chat template only adds text, so the messages' characters alone can prove the prompt too long.
        self.check_prompt_chars(sum(_text_chars(m.get("content")) for m in request.messages), "messages")
        prompt_ids = await self.engine.run_in_tokenizer_thread(apply_chat_template, self.tokenizer,
                                                               request.messages)
        params = request.to_sampling_params(self.resolve_max_tokens(len(prompt_ids), request.requested_max_tokens))
        params = with_constraints(request, params)  # structured outputs
        request_id = random_id("chatcmpl")
        streams = await self.add_requests(request_id, [prompt_ids], [params], request.priority)
        header = dict(id=request_id, created=int(time.time()), model=model_name)
        if request.stream:
            return SSEStream(self._stream(request, len(prompt_ids), merge_streams(streams), header), streams,
                             deadline)
        (final,) = await collect_final(streams)
        choices = [
            ChatChoice(index=c.index, message=ChatMessage(role="assistant", content=c.text),
                       logprobs=self._logprobs(request, c.token_ids, c.logprobs), finish_reason=c.finish_reason,
                       stop_reason=c.stop_reason)
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]
        num_generated = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=num_generated,
                          total_tokens=len(prompt_ids) + num_generated)
        return ChatCompletionResponse(**header, choices=choices, usage=usage)

    def _logprobs(self, request: ChatCompletionRequest, token_ids: list[int],
                  steps: list[dict[int, Logprob] | None] | None) -> ChatLogProbs | None:
        """Per token: its text, logprob, UTF-8 bytes and the ``top_logprobs`` most likely tokens."""
        if not request.logprobs:
            return None
        num_top = request.top_logprobs or 0
        content = []
        for token_id, step in zip(token_ids, steps or [None] * len(token_ids), strict=True):
            step = step or {}
            sampled = step.get(token_id)
            token = self.token_text(token_id, sampled)
            ranked = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            top = [self._top_logprob(t, lp) for t, lp in ranked]
            content.append(ChatLogprobToken(token=token, logprob=clamp_logprob(sampled.logprob if sampled else None),
                                            bytes=list(token.encode("utf-8")), top_logprobs=top))
        return ChatLogProbs(content=content)

    def _top_logprob(self, token_id: int, logprob: Logprob) -> TopLogprob:
        token = self.token_text(token_id, logprob)
        return TopLogprob(token=token, logprob=clamp_logprob(logprob.logprob), bytes=list(token.encode("utf-8")))

    async def _stream(self, request: ChatCompletionRequest, num_prompt_tokens: int,
                      outputs: AsyncIterator[tuple[int, RequestOutput]], header: dict) -> AsyncIterator[str]:
        n = request.n or 1
        tracker = DeltaTracker(n)
        usage = UsageInfo(prompt_tokens=num_prompt_tokens)
        for index in range(n):  # the role first, before any token exists (as OpenAI does)
            choice = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            yield sse(ChatCompletionChunk(**header, choices=[choice]))
        async for _, output in outputs:
            for sample in output.outputs:
                delta = tracker.next(sample.index, sample)
                if delta is None or not (delta.text or sample.finish_reason or (delta.token_ids and request.logprobs)):
                    continue
                if sample.finish_reason:
                    usage.completion_tokens += len(sample.token_ids)
                choice = ChatStreamChoice(
                    index=sample.index, delta=DeltaMessage(content=delta.text) if delta.text else DeltaMessage(),
                    logprobs=self._logprobs(request, delta.token_ids, delta.logprobs),
                    finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)
                yield sse(ChatCompletionChunk(**header, choices=[choice]))
        if request.include_usage_in_stream:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield sse(ChatCompletionChunk(**header, choices=[], usage=usage))

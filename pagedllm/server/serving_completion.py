"""POST /v1/completions: prompts (text or token ids, one or many) -> completions, whole or streamed.

One engine request per prompt; its n samples come back as choices
``prompt_index * n + sample_index``, as OpenAI numbers them. Streamed chunks
carry the new suffix of each choice's cumulative text; ``echo`` puts the prompt
(and with ``logprobs`` its prompt logprobs) in front of the first one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from pagedllm.server.serving_engine import (
    DeltaTracker,
    OpenAIServing,
    SSEStream,
    bad_request,
    clamp_logprob,
    collect_final,
    merge_streams,
    random_id,
    sse,
    with_constraints,
)

StepLogprobs = dict[int, Logprob] | None


@dataclass
class _Prompt:
    text: str | None  # None for token-id prompts until echo needs it decoded
    token_ids: list[int]


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | SSEStream:
        """Validate, add the requests, and return the response or (stream=True) the SSE lines."""
        deadline = self.deadline()  # a stream's deadline counts from arrival, like a whole response's
        model_name = self.check_model(request.model)
        self.check_logprobs(logprobs=request.logprobs, prompt_logprobs=request.prompt_logprobs)
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not available when streaming", "prompt_logprobs")
        prompts = await self._tokenize(request)
        build = request.to_beam_search_params if request.use_beam_search else request.to_sampling_params
        params = [build(self.resolve_max_tokens(len(p.token_ids), request.max_tokens)) for p in prompts]
        params = [with_constraints(request, p) for p in params]  # constraints (a 400 with beam search)
        request_id = f"cmpl-{request.request_id}" if request.request_id else random_id("cmpl")
        streams = await self.add_requests(request_id, [p.token_ids for p in prompts], params, request.priority,
                                          request.model)
        header = dict(id=request_id, created=int(time.time()), model=model_name)
        if request.stream:
            return SSEStream(self._stream(request, prompts, merge_streams(streams), header), streams,
                             deadline)
        finals = await collect_final(streams)
        choices, usage = [], UsageInfo()
        for prompt, final in zip(prompts, finals, strict=True):
            usage.prompt_tokens += len(prompt.token_ids)
            for sample in sorted(final.outputs, key=lambda c: c.index):  # best_of: the engine keeps the n best
                usage.completion_tokens += len(sample.token_ids)
                choices.append(self._choice(request, prompt, final, sample, len(choices)))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(**header, choices=choices, usage=usage)

    async def _tokenize(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt: a string or one list of token ids
        if not raw:
            raise bad_request("prompt must not be empty", "prompt")
        self.check_limits(request.n, request.best_of, request.stop, len(raw))
        texts = [p for p in raw if isinstance(p, str)]
        for text in texts:  # before tokenizing: a huge prompt would hold the one tokenizer thread
            self.check_prompt_chars(len(text), "prompt")
        special = request.add_special_tokens is not False
        encoded = iter(await self.engine.run_in_tokenizer_thread(
            lambda: [self.tokenizer.encode(t, add_special_tokens=special) for t in texts]))
        prompts = []
        keep = request.truncate_prompt_tokens
        for p in raw:
            if isinstance(p, str):
                ids = self.truncate_prompt(next(encoded), keep)
                # A truncated prompt echoes the text of what is left (decoded below).
                prompts.append(_Prompt(p if keep is None else None, ids))
            else:
                self.check_token_ids(p, "prompt")
                prompts.append(_Prompt(None, self.truncate_prompt(list(p), keep)))
        if request.echo and self.tokenizer is not None:
            undecoded = [p for p in prompts if p.text is None]
            decoded = await self.engine.run_in_tokenizer_thread(
                lambda: [self.tokenizer.decode(p.token_ids) for p in undecoded])
            for p, text in zip(undecoded, decoded, strict=True):
                p.text = text
        return prompts

    def _choice(self, request: CompletionRequest, prompt: _Prompt, final: RequestOutput,
                sample: CompletionOutput, index: int) -> CompletionChoice:
        text, token_ids, step_logprobs = sample.text, sample.token_ids, self._steps(sample)
        if request.echo:
            text = (prompt.text or "") + text
            token_ids = prompt.token_ids + token_ids
            step_logprobs = self._prompt_steps(final, prompt) + step_logprobs
        logprobs = None
        if request.logprobs is not None:
            logprobs = self.completion_logprobs(token_ids, step_logprobs, request.logprobs, 0,
                                                request.return_tokens_as_token_ids)
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            prompt_logprobs = self.prompt_logprobs_json(final)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _steps(sample: CompletionOutput) -> list[StepLogprobs]:
        return list(sample.logprobs) if sample.logprobs is not None else [None] * len(sample.token_ids)

    @staticmethod
    def _prompt_steps(final: RequestOutput, prompt: _Prompt) -> list[StepLogprobs]:
        steps = list(final.prompt_logprobs or [])
        return steps + [None] * (len(prompt.token_ids) - len(steps))

    def completion_logprobs(self, token_ids: list[int], steps: list[StepLogprobs], num_top: int,
                            text_offset: int, as_id: bool = False) -> CompletionLogProbs:
        """OpenAI's legacy logprobs: per token its text, logprob, offset and the top alternatives.

        ``top_logprobs`` holds the sampled token plus the top ``num_top`` (so up to num_top + 1
        entries, as OpenAI documents); a position without logprobs (the first prompt token) is null.
        """
        out = CompletionLogProbs()
        for token_id, step in zip(token_ids, steps, strict=True):
            sampled = step.get(token_id) if step else None
            token = self.token_text(token_id, sampled, as_id)
            out.tokens.append(token)
            out.text_offset.append(text_offset)
            text_offset += len(self.token_text(token_id, sampled) if as_id else token)  # offsets count text
            if step is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(clamp_logprob(sampled.logprob if sampled else None))
            ranked = sorted(step.items(), key=lambda kv: (kv[0] != token_id, -kv[1].logprob))[: num_top + 1]
            out.top_logprobs.append({self.token_text(t, lp, as_id): clamp_logprob(lp.logprob) for t, lp in ranked})
        return out

    async def _stream(self, request: CompletionRequest, prompts: list[_Prompt],
                      outputs: AsyncIterator[tuple[int, RequestOutput]], header: dict) -> AsyncIterator[str]:
        n = request.n or 1
        tracker = DeltaTracker(n * len(prompts))
        sent_chars = [0] * (n * len(prompts))  # text already sent per choice, echo included: the logprob offsets
        num_generated = [0] * (n * len(prompts))  # tokens per choice so far (usage)
        usage = UsageInfo(prompt_tokens=sum(len(p.token_ids) for p in prompts))
        async for i, output in outputs:
            for sample in output.outputs:
                index = i * n + sample.index
                delta = tracker.next(index, sample)
                if delta is None:
                    continue
                text, token_ids, steps = delta.text, delta.token_ids, delta.logprobs
                if request.echo and delta.first:
                    prompt = prompts[i]
                    text = (prompt.text or "") + text
                    token_ids = prompt.token_ids + token_ids
                    steps = self._prompt_steps(output, prompt) + steps
                if not (text or sample.finish_reason or (token_ids and request.logprobs is not None)):
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self.completion_logprobs(token_ids, steps, request.logprobs, sent_chars[index],
                                                        request.return_tokens_as_token_ids)
                sent_chars[index] += len(text)
                num_generated[index] = len(sample.token_ids)
                usage.completion_tokens = sum(num_generated)
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)
                chunk_usage = usage.model_copy() if request.include_continuous_usage else None
                yield sse(CompletionResponse(**header, choices=[choice], usage=chunk_usage))
        if request.include_usage_in_stream:
            yield sse(CompletionResponse(**header, choices=[], usage=usage))

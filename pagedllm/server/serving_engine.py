"""What the completion and chat handlers share: errors, model and length checks, request fan-out.

``OpenAIServing`` adds one engine request per prompt (all of them before a
response starts, so a rejected prompt is still a clean 400), merges their
output streams, and aborts every one of them when the handler ends early (a
client that disconnects, an error, a cancelled task): no request outlives its
HTTP connection and no block stays held.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError, RequestStream
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.server.lora_modules import LoRAModules
from pagedllm.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# JSON has no -inf; OpenAI-compatible servers clamp logprobs to this floor.
LOGPROB_FLOOR = -9999.0
# Seconds a client turned away by the waiting-queue bound is told to wait (Retry-After).
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServingLimits:
    """Per-request bounds that keep one client from holding the engine (all 400s, naming the field)."""

    max_n: int = 128  # n and best_of: each sample is a sequence in the batch
    max_prompts_per_request: int = 64
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024
    request_timeout: float | None = None  # seconds until a request is aborted (504); None: no deadline
    max_logprobs: int = 20  # logprobs, top_logprobs and prompt_logprobs (--max-logprobs)


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers

    def to_response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)

    def to_sse(self) -> str:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))
        return f"data: {body.model_dump_json()}\n\n"


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, "invalid_request_error", param, "invalid_value")


def value_error_to_400(message: str) -> OpenAIError:
    """A 400 whose ``param`` is the field the message starts with (our ValueErrors name it first)."""
    head = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":,")
    return bad_request(message, head if head.isidentifier() else None)


def to_openai_error(error: BaseException) -> OpenAIError:
    """Map an exception from validation or the engine to the error the client sees."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ValueError):
        return value_error_to_400(str(error))
    if isinstance(error, EngineDeadError):
        return OpenAIError(str(error), 503, "server_error", code="engine_dead")
    if isinstance(error, EngineOverloadedError):
        # 429, not 503: the server is healthy, this client should come back shortly (OpenAI's SDK retries both).
        return OpenAIError(str(error), 429, "server_error", code="too_many_requests",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    return internal_error(error)


def internal_error(error: BaseException) -> OpenAIError:
    """A 500 that tells the client only an id to quote; the details go to the log under that id."""
    error_id = random_id("err")
    logger.error("request failed [%s]", error_id, exc_info=error)
    return OpenAIError(f"The server had an error while processing your request (request id {error_id}).", 500,
                       "server_error", code="internal_error", headers={"X-Request-Id": error_id})


def request_timeout_error() -> OpenAIError:
    # 504, not 408: 408 says the client was too slow to send its request; here the server was too slow to answer.
    return OpenAIError("The request did not finish within the server's --request-timeout and was aborted.", 504,
                       "server_error", code="request_timeout")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp_logprob(value: float | None) -> float:
    if value is None or value != value:  # None or NaN
        return LOGPROB_FLOOR
    return max(value, LOGPROB_FLOOR)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str],
                 limits: ServingLimits | None = None, loras: LoRAModules | None = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.loras = loras  # LoRA adapters served by name (None: LoRA off)
        self.tokenizer = engine.tokenizer
        self.limits = limits or ServingLimits()
        self._max_token_chars: int | None = None

    def deadline(self) -> float | None:
        """When a request that arrives now must end (event-loop time), under --request-timeout."""
        timeout = self.limits.request_timeout
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    def check_limits(self, n: int | None, best_of: int | None, stop: str | list[str] | None,
                     num_prompts: int = 1) -> None:
        """400 for a request whose size alone would hold the engine (n, best_of, prompts, stop strings)."""
        lim = self.limits
        for name, value in (("n", n), ("best_of", best_of)):
            if isinstance(value, int) and value > lim.max_n:
                raise bad_request(f"{name} must be at most {lim.max_n} (the server's --max-n), got {value}", name)
        if num_prompts > lim.max_prompts_per_request:
            raise bad_request(f"prompt holds {num_prompts} prompts; this server takes at most "
                              f"{lim.max_prompts_per_request} per request (--max-prompts-per-request)", "prompt")
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > lim.max_stop_strings:
            raise bad_request(f"stop holds {len(stops)} strings; at most {lim.max_stop_strings} are allowed", "stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > lim.max_stop_string_chars:
            raise bad_request(f"stop strings must be at most {lim.max_stop_string_chars} characters, "
                              f"got one of {longest}", "stop")

    @property
    def max_token_chars(self) -> int:
        """The longest token string in the vocabulary (computed once): a bound on characters per token."""
        if self._max_token_chars is None:
            get_vocab = getattr(self.tokenizer, "get_vocab", None)  # none: no bound, the check is skipped
            vocab = get_vocab() if get_vocab is not None else {}
            self._max_token_chars = max((len(t) for t in vocab), default=0)
        return self._max_token_chars

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """400 before tokenizing when the character count alone proves the prompt too long.

        No token covers more than ``max_token_chars`` characters, so a text of more than
        ``max_model_len * max_token_chars`` characters has more than ``max_model_len`` tokens.
        (Byte-level tokens are spelled one character per byte, so their length bounds the text's.)
        """
        bound = self.max_model_len * self.max_token_chars
        if self.max_token_chars and num_chars > bound:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"your {param} has {num_chars} characters, more than any text of "
                              f"{self.max_model_len} tokens can have ({bound}). Please reduce its length.", param)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        hf_config = getattr(self.engine.model_config, "hf_config", None)
        return int(getattr(hf_config, "vocab_size", None) or len(self.tokenizer))

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        # Checked here as well as in the engine: an id past the embedding would fail the whole batch's step.
        vocab_size = self.vocab_size
        for t in token_ids:
            if not 0 <= t < vocab_size:
                raise bad_request(f"{param} contains token id {t}, outside the vocabulary [0, {vocab_size})", param)

    def check_model(self, model: str | None) -> str:
        """The name to report for the requested ``model`` (None means the served model); 404 if unknown."""
        if model is None or model in self.served_model_names:
            return self.served_model_names[0] if model is None else model
        if self.lora_for(model) is not None:
            return model
        raise OpenAIError(f"The model `{model}` does not exist.", 404, "invalid_request_error", "model",
                          "model_not_found")

    def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """``requested``, or all the room the context leaves; 400 if the prompt and it do not fit."""
        if prompt_len == 0:
            raise bad_request("prompt must not be empty", "prompt")
        room = self.max_model_len - prompt_len
        if requested is None:
            if room < 1:
                raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. "
                                  f"However, your prompt has {prompt_len} tokens. Please reduce its length.",
                                  "messages")
            return room
        if isinstance(requested, int) and requested > room:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                              f"{requested} in the completion). Please reduce the prompt or max_tokens.",
                              "max_tokens")
        return requested

    def lora_for(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names; None for the base model."""
        return self.loras.get(model) if self.loras is not None else None

    async def add_requests(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
                           priority: int, model: str | None = None) -> list[RequestStream]:
        """Add one engine request per prompt (with the adapter ``model`` names, if it names one);
        if any is rejected, abort those already added and raise."""
        streams: list[RequestStream] = []
        lora_request = self.lora_for(model)
        try:
            for i, (prompt_ids, sp) in enumerate(zip(prompts, params, strict=True)):
                streams.append(await self.engine.add_request(f"{request_id}-{i}", prompt_ids, sp, priority,
                                                             lora_request))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams

    def token_text(self, token_id: int, logprob: Logprob | None, as_id: bool = False) -> str:
        """A token as logprobs show it; ``as_id`` (return_tokens_as_token_ids): ``token_id:<id>``, which
        survives tokens that are not whole UTF-8 characters."""
        if as_id:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def check_logprobs(self, **requested: int | None) -> None:
        """400 for a logprobs count above --max-logprobs, naming the field."""
        bound = self.limits.max_logprobs
        for name, value in requested.items():
            if isinstance(value, int) and not isinstance(value, bool) and value > bound:
                raise bad_request(f"{name} must be at most {bound} (the server's --max-logprobs), got {value}", name)

    @staticmethod
    def truncate_prompt(prompt_ids: list[int], keep: int | None) -> list[int]:
        """truncate_prompt_tokens (vLLM): keep only the last ``keep`` tokens of the prompt."""
        return prompt_ids if keep is None else prompt_ids[-keep:]

    def prompt_logprobs_json(self, output: RequestOutput) -> list[dict[str, Any] | None] | None:
        """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}
        (keyed by id already, so return_tokens_as_token_ids leaves the decoded text alone)."""
        if output.prompt_logprobs is None:
            return None
        return [None if step is None else
                {str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                          "decoded_token": self.token_text(t, lp)} for t, lp in step.items()}
                for step in output.prompt_logprobs]


def sse(chunk: BaseModel) -> str:
    """One server-sent event. A choice's ``finish_reason`` and ``logprobs`` are sent as null until set, as
    OpenAI's chunks carry them; fields declared with ``_omit_none`` (delta.role, usage) are left out instead."""
    return f"data: {chunk.model_dump_json()}\n\n"


class _DeadlinePassed(Exception):
    """A stream's --request-timeout ran out (kept apart from TimeoutErrors raised inside the handler)."""


class SSEStream:
    """The body of a streamed response: ``events`` then ``data: [DONE]``, an error as an error event.

    It holds the requests so that ``aclose()`` can abort them however the response ends:
    closing a generator is not enough, since one that never started (the client left
    before the first chunk) runs no ``finally``.
    """

    def __init__(self, events: AsyncGenerator[str, None], streams: list[RequestStream],
                 deadline: float | None = None) -> None:
        self.events = events
        self.streams = streams
        self.deadline = deadline  # event-loop time (from ``OpenAIServing.deadline``); None: none

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _next(self) -> str:
        if self.deadline is None:
            return await anext(self.events)
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:  # per event, not around the loop: a timeout spanning a yield would cancel the sender instead
            return await asyncio.wait_for(anext(self.events), max(remaining, 0))
        except TimeoutError:
            raise _DeadlinePassed from None

    async def _run(self) -> AsyncIterator[str]:
        try:
            while True:
                try:
                    event = await self._next()
                except StopAsyncIteration:
                    break
                yield event
        except _DeadlinePassed:
            yield request_timeout_error().to_sse()
        except Exception as e:  # the headers are sent: report the error in the stream
            yield to_openai_error(e).to_sse()
        finally:
            await self.aclose()
        yield "data: [DONE]\n\n"

    async def aclose(self) -> None:
        for stream in self.streams:
            stream.abort()
        await self.events.aclose()


@dataclass
class Delta:
    """What one choice gained since the previous chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # one per new token; None entries when not computed
    first: bool  # the choice's first chunk
    sample: CompletionOutput  # the cumulative output (finish_reason, stop_reason, all token ids)


class DeltaTracker:
    """Turns cumulative outputs into per-choice deltas; a finished choice yields nothing more.

    (A finished sample keeps appearing in its request's outputs while its siblings run.)
    """

    def __init__(self, num_choices: int) -> None:
        self.seen_chars = [0] * num_choices
        self.seen_tokens = [0] * num_choices
        self.started = [False] * num_choices
        self.finished = [False] * num_choices

    def next(self, index: int, sample: CompletionOutput) -> Delta | None:
        if self.finished[index]:
            return None
        start = self.seen_tokens[index]
        token_ids = sample.token_ids[start:]
        logprobs = list(sample.logprobs[start:]) if sample.logprobs is not None else [None] * len(token_ids)
        delta = Delta(sample.text[self.seen_chars[index]:], token_ids, logprobs, not self.started[index], sample)
        self.seen_chars[index], self.seen_tokens[index] = len(sample.text), len(sample.token_ids)
        self.started[index] = True
        self.finished[index] = sample.finish_reason is not None
        return delta


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, output) from all streams as they arrive; abort them all when closed early."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
            queue.put_nowait((i, None))
        except Exception as e:  # the engine's error for this request: re-raised to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    """The finished output of every stream, in prompt order."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, output in merge_streams(streams):
        finals[i] = output
    return [f for f in finals if f is not None]


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client leaves.

    Streaming responses need no help: Starlette cancels the body iterator on disconnect.
    """
    handler_task = asyncio.ensure_future(handler)

    async def wait_disconnect() -> None:
        while True:
            message: dict[str, Any] = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait([handler_task, watcher], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handler_task.cancel()
        raise
    finally:
        watcher.cancel()
    if not handler_task.done():
        handler_task.cancel()
        return Response(status_code=499)  # nobody reads it: the client is gone
    return handler_task.result()


# --- structured outputs and token constraints (issue 16) ---
# Imports local to this block keep the merge with the other server changes to this one place.
_GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                   "guided_grammar": "grammar"}


def with_constraints(request: Any, params: SamplingParams) -> SamplingParams:
    """``params`` plus the request's response_format / structured_outputs / guided_* / logit_bias /
    allowed_token_ids / bad_words (a 400 naming the field when one is malformed or cannot compile)."""
    import dataclasses

    fields = constraint_fields(request)
    if not fields:
        return params
    try:
        return dataclasses.replace(params, **fields)
    except ValueError as e:
        raise value_error_to_400(str(e)) from None


def constraint_fields(request: Any) -> dict[str, Any]:
    """The SamplingParams fields these request fields map to (only those the request set)."""
    fields: dict[str, Any] = {}
    spec = _structured_outputs_spec(request)
    if spec is not None:
        fields["structured_outputs"] = spec
    if request.logit_bias:
        bias = {}
        for key, value in request.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            bias[int(key)] = value
        fields["logit_bias"] = bias
    if request.allowed_token_ids is not None:
        fields["allowed_token_ids"] = request.allowed_token_ids
    if request.bad_words:
        fields["bad_words"] = request.bad_words
    if fields and getattr(request, "use_beam_search", False):  # beams are scored unconstrained: refuse, not ignore
        names = ", ".join("structured outputs" if f == "structured_outputs" else f for f in fields)
        raise bad_request(f"use_beam_search cannot be combined with {names}", "use_beam_search")
    return fields


def _structured_outputs_spec(request: Any) -> Any:
    """The one StructuredOutputsParams the request asks for (None: unconstrained), parsed to catch bad specs."""
    from pagedllm.sampling_params import StructuredOutputsParams

    sources: list[tuple[str, dict[str, Any]]] = []  # (field the client sent, StructuredOutputsParams kwargs)
    rf = request.response_format
    if rf is not None and rf.get("type", "text") != "text":
        sources.append(_response_format_spec(rf))
    if request.structured_outputs is not None:
        sources.append(("structured_outputs", request.structured_outputs))
    for name, kind in _GUIDED_ALIASES.items():
        if getattr(request, name) is not None:
            sources.append((name, {kind: getattr(request, name)}))
    if not sources:
        return None
    from pagedllm.structured_output.backend import parse_grammar

    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise bad_request(f"only one output constraint may be given, got {names}", sources[1][0])
    field_name, kwargs = sources[0]
    unknown = sorted(set(kwargs) - {"json", "regex", "choice", "grammar", "json_object"})
    if unknown:
        raise bad_request(f"{field_name}.{unknown[0]} is not supported (supported: json, regex, choice, grammar, "
                          "json_object)", field_name)
    try:
        spec = StructuredOutputsParams(**kwargs)
        parse_grammar(spec)  # fast and tokenizer-free: the 400 names the field the client used
    except ValueError as e:
        message = str(e)
        if field_name != "structured_outputs":
            message = message.replace(f"structured_outputs.{next(iter(kwargs), '')}", field_name)
            message = message.replace("structured_outputs", field_name)
        raise bad_request(message, field_name.split(".")[0]) from None
    return spec


def _response_format_spec(rf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = rf.get("type")
    if kind == "json_object":
        return "response_format", {"json_object": True}
    if kind == "json_schema":
        body = rf.get("json_schema")
        schema = body.get("schema") if isinstance(body, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object", "response_format")
        return "response_format.json_schema.schema", {"json": schema}
    raise bad_request(f"response_format.type must be one of text, json_object, json_schema; got {kind!r}",
                      "response_format")
# --- end structured outputs ---

"""The OpenAI wire format: pydantic models for requests, responses, stream chunks and errors.

Requests are parsed strictly (a string where a number belongs is a 400, not a
silent coercion). No field is silently ignored: a field this server does not
implement is a 400 naming it (``UNSUPPORTED_FIELDS`` says why for the known ones,
as OpenAI answers "Unrecognized request argument" for the rest); docs/API_FIELDS.md
is the field-by-field table. Ranges are checked once, by ``SamplingParams``; the
``to_sampling_params`` methods only translate names.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedllm.sampling_params import BeamSearchParams, SamplingParams

# Fields of the OpenAI / vLLM schemas this server does not implement, with the reason the 400 gives.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "functions": "use tools instead (functions is deprecated)",
    "function_call": "use tool_choice instead (function_call is deprecated)",
    "audio": "this server generates text only",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "the served model has no reasoning mode",
    "verbosity": "the served model has no verbosity control",
    "web_search_options": "this server has no web search",
    "logits_processors": "custom logits processors are not implemented",
    "mm_processor_kwargs": "the served model takes text only",
    "prompt_embeds": "prompts must be text or token ids",
    "cache_salt": "per-request prefix-cache salts are not implemented",
    "kv_transfer_params": "disaggregated prefill is not implemented",
    "vllm_xargs": "no extension takes extra arguments",
    "return_token_ids": "use logprobs with return_tokens_as_token_ids",
}


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _check_unicode(self) -> RequestModel:
        # JSON lets "\ud800" through; the tokenizer and the response encoder would fail on it later (a 500).
        for name, value in self:
            path = _lone_surrogate(value, name)
            if path is not None:
                raise ValueError(f"{path} is not valid Unicode (it contains a lone surrogate)")
        return self


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string under ``value`` that cannot be encoded as UTF-8, else None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, list):
        items = enumerate(value)
        return next((p for i, v in items if (p := _lone_surrogate(v, f"{path}[{i}]")) is not None), None)
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _lone_surrogate(k, path) or
                                                       _lone_surrogate(v, f"{path}.{k}")) is not None), None)
    return None


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- errors -----------------------------------------------------------------
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ---- shared -----------------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage (so far) on every chunk


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _omit_none() -> Any:
    """A field left out of the JSON while None (a delta's role, a chunk's usage), as OpenAI sends them."""
    return Field(default=None, exclude_if=lambda v: v is None)


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _SamplingFields(RequestModel):
    """Fields common to both endpoints, including vLLM's extras."""

    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: int = 0
    # --- structured outputs and token constraints (issue 16); mapped by serving_engine.constraint_fields ---
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    structured_outputs: dict[str, Any] | None = None  # vLLM: json, regex, choice, grammar, json_object
    guided_json: str | dict[str, Any] | None = None  # vLLM's older names for structured_outputs' fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # --- end structured outputs ---
    # vLLM extras answered by the tools/fields work (docs/API_FIELDS.md)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    return_tokens_as_token_ids: bool = False
    add_special_tokens: bool | None = None  # None: the endpoint's default (chat False, completions True)
    request_id: str | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        for name in self.model_extra or {}:
            reason = UNSUPPORTED_FIELDS.get(name, "it is not a field of this API (docs/API_FIELDS.md)")
            raise ValueError(f"{name} is not supported: {reason}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.request_id is not None and not (0 < len(self.request_id) <= 128):
            raise ValueError("request_id must be 1 to 128 characters")
        self._check_beam_search()
        return self

    def _check_beam_search(self) -> None:
        """Beam search runs through the engine's BeamSearchManager, which scores beams itself: fields that
        sample or stream do not apply, and are refused rather than dropped."""
        if not self.use_beam_search:
            if self.length_penalty != 1.0:
                raise ValueError("length_penalty only applies with use_beam_search")
            return
        if self.stream:
            raise ValueError("use_beam_search does not stream; send stream false")
        for name in ("stop", "stop_token_ids", "prompt_logprobs", "seed", "top_p", "top_k", "min_p",
                     "presence_penalty", "frequency_penalty", "repetition_penalty", "best_of", "logprobs"):
            if getattr(self, name, None) not in (None, False, [], "", 1.0):
                raise ValueError(f"{name} cannot be combined with use_beam_search")
        if self.min_tokens or self.include_stop_str_in_output:
            raise ValueError("min_tokens and include_stop_str_in_output cannot be combined with use_beam_search")

    def to_beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        return BeamSearchParams(beam_width=self.n or 1, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                length_penalty=self.length_penalty)

    @property
    def include_continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def _sampling_kwargs(self) -> dict[str, Any]:
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return dict(
            n=pick(self.n, 1),
            temperature=pick(self.temperature, 1.0),
            top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0),
            min_p=pick(self.min_p, 0.0),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- /v1/completions ----------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.stream and self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of must equal n when stream is true")
        return self

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        kwargs = self._sampling_kwargs()
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = self.logprobs  # echoed prompt tokens carry logprobs too
        return SamplingParams(**kwargs, best_of=self.best_of, max_tokens=max_tokens, logprobs=self.logprobs,
                              prompt_logprobs=prompt_logprobs)


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(ResponseModel):
    """One token's entry in vLLM's ``prompt_logprobs`` (keyed by the token id as a string)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _omit_none()  # vLLM's shape


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = _omit_none()


# ---- tools ----------------------------------------------------------------------
class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionToolParam(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


# ---- /v1/chat/completions -------------------------------------------------------
class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ChatCompletionToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: dict[str, Any] | None = None
    # chat template (vLLM)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    echo: bool = False
    # OpenAI fields with nothing to do here, accepted as OpenAI documents them (docs/API_FIELDS.md)
    metadata: dict[str, str] | None = None
    store: bool | None = False
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs requires logprobs to be true")
            if not 0 <= self.top_logprobs <= 20:
                raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.store:
            raise ValueError("store is not supported: this server keeps no completions")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message cannot be combined with add_generation_prompt: "
                             "send add_generation_prompt false to continue the last message")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools: send the functions the model may call in tools")
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tools must have distinct function names")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {choice.function.name!r}, "
                                 "which is not in tools")
            if self.tool_choice is None:
                self.tool_choice = "auto"  # OpenAI's default when tools are given
        if self.use_beam_search and self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice cannot be combined with use_beam_search")

    @property
    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as plain dicts (the chat template and the schema builder take these)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def tool_choice_dict(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(**self._sampling_kwargs(), max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=self.prompt_logprobs)


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(ResponseModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(ResponseModel):
    name: str | None = _omit_none()
    arguments: str | None = _omit_none()


class DeltaToolCall(ResponseModel):
    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: DeltaFunctionCall | None = _omit_none()


class ChatMessage(ResponseModel):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = _omit_none()  # present only when the model called tools


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _omit_none()


class DeltaMessage(ResponseModel):
    role: str | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[DeltaToolCall] | None = _omit_none()


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = _omit_none()


# ---- /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM) -----------------------------
class LoadLoRAAdapterRequest(RequestModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestModel):
    lora_name: str
    lora_int_id: int | None = None  # accepted as vLLM takes it; the name decides


# ---- /tokenize, /detokenize, /v1/embeddings (vLLM) ------------------------------------
class TokenizeRequest(RequestModel):
    """Either ``prompt`` (text, tokenized as /v1/completions does) or ``messages`` (through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatCompletionToolParam] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _check_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt and messages: send exactly one of them")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise ValueError("continue_final_message cannot be combined with add_generation_prompt")
        return self


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _omit_none()


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str

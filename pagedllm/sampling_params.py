"""SamplingParams: how to pick each next token and when to stop, as vLLM users know it.

Pure Python (no torch). Every field is validated on construction; a bad value
raises ``ValueError`` naming the field, so the server can answer HTTP 400.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
# OpenAI's range for logit_bias values.
_MAX_LOGIT_BIAS = 100.0


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM names it: exactly one of the fields is set.

    ``json``: a JSON schema (string or object); ``regex``; ``choice``: the output is one
    of these strings; ``grammar``: an EBNF grammar (xgrammar / GBNF syntax); ``json_object``:
    any JSON object. The grammar is built by pagedllm/structured_output when the engine
    takes the request; a schema or pattern that does not compile is a ValueError there.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_CONSTRAINTS)}; "
                             f"got {' and '.join(given) if given else 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        ok = {
            "json": isinstance(value, dict) or (isinstance(value, str) and value.strip() != ""),
            "regex": isinstance(value, str) and value != "",
            "choice": isinstance(value, list) and bool(value) and all(isinstance(c, str) and c for c in value),
            "grammar": isinstance(value, str) and value.strip() != "",
            "json_object": value is True,
        }[kind]
        if not ok:
            raise ValueError(f"structured_outputs.{kind} must be {_CONSTRAINTS[kind]}, got {value!r:.200}")
        if kind == "json" and isinstance(value, str):
            try:
                json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None

    @property
    def kind(self) -> str:
        """The one field that is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable identity of the constraint (the grammar cache's key): equal specs share a grammar."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif kind == "choice":
            value = json.dumps(value)
        return kind, str(value)


_CONSTRAINTS = {
    "json": "a JSON schema (an object or a string holding one)",
    "regex": "a non-empty regular expression string",
    "choice": "a non-empty list of non-empty strings",
    "grammar": "a non-empty EBNF grammar string",
    "json_object": "true",
}


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # "cumulative": a RequestOutput every step (streaming); "final_only": one when finished (offline LLM).
    output_kind: str = "cumulative"
    # Constrained decoding (pagedllm/structured_output) and logits-level constraints (the sampler).
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never generated (as token sequences; see resolve_token_constraints)
    # Filled in by the engine, not by users: all token ids that end generation (EOS + extra).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        self._validate()
        self.all_stop_token_ids = set(self.stop_token_ids)
        # bad_words as token id sequences, set by resolve_token_constraints (it needs the tokenizer).
        self.bad_words_token_ids: list[list[int]] = []

    def _validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name} {msg}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        need(
            is_int(self.best_of) and self.best_of >= self.n,
            "best_of",
            f"must be an integer >= n ({self.n}), got {self.best_of!r}",
        )
        need(is_num(self.temperature) and self.temperature >= 0, "temperature",
             f"must be a number >= 0, got {self.temperature!r}")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        need(is_int(self.top_k) and self.top_k >= -1, "top_k",
             f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             f"must be in [-2, 2], got {self.presence_penalty!r}")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"must be in [-2, 2], got {self.frequency_penalty!r}")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             f"must be > 0, got {self.repetition_penalty!r}")
        need(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
             f"must be an integer in [-2**63, 2**63), got {self.seed!r}")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             f"must be an integer >= 1, got {self.max_tokens!r}")
        need(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
             f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            need(self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        need(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
             f"must be an integer in [0, 20], got {self.logprobs!r}")
        need(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs", f"must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        need(self.output_kind in ("cumulative", "final_only"), "output_kind",
             f"must be 'cumulative' or 'final_only', got {self.output_kind!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative integers")
        self._validate_token_constraints(is_int, is_num)

    def _validate_token_constraints(self, is_int: Any, is_num: Any) -> None:
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
            for t, bias in self.logit_bias.items():
                if not (is_int(t) and t >= 0):
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
                if not (is_num(bias) and -_MAX_LOGIT_BIAS <= bias <= _MAX_LOGIT_BIAS):
                    raise ValueError(f"logit_bias[{t}] must be a number in [-100, 100], got {bias!r}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not (isinstance(ids, (list, tuple)) and ids and all(is_int(t) and t >= 0 for t in ids)):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {ids!r:.200}")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not (isinstance(words, (list, tuple)) and all(isinstance(w, str) and w.strip() for w in words)):
                raise ValueError(f"bad_words must be a list of non-blank strings, got {words!r:.200}")
            self.bad_words = list(words)

    def resolve_token_constraints(self, tokenizer: Any, vocab_size: int) -> None:
        """Check token ids against the vocabulary and tokenize ``bad_words`` (the engine calls this once).

        As in vLLM, each bad word is banned both as written and with a leading space (the
        two spellings a BPE tokenizer gives a word mid-text): its last token is masked
        whenever the tokens before it were just generated.
        """
        for name, ids in (("logit_bias", self.logit_bias or {}), ("allowed_token_ids", self.allowed_token_ids or [])):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"{name} contains token id {t}, outside the vocabulary [0, {vocab_size})")
        if not self.bad_words:
            return
        if tokenizer is None:
            raise ValueError("bad_words needs a tokenizer; the engine runs without one (skip_tokenizer_init)")
        sequences: list[list[int]] = []
        for word in self.bad_words:
            for text in (word, " " + word.lstrip()):
                ids = list(tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences and all(t < vocab_size for t in ids):
                    sequences.append(ids)
        self.bad_words_token_ids = sequences

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def clone(self) -> SamplingParams:
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Beam search settings, as vLLM's `LLM.beam_search` takes them."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # accepted for vLLM compatibility; beams are scored on the raw distribution
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")

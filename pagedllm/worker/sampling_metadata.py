"""Sampling settings: per row of the persistent batch, and per step as device tensors.

``SamplingState`` keeps each row's settings (temperature, filters, penalties,
min_tokens, logprob counts, its seeded generator) in numpy arrays, filled once
when a request joins the batch. Each step ``SamplingState.metadata(rows, ...)``
gathers the rows that sample into a ``SamplingMetadata`` of device tensors, the
input of the sampler (models/layers/sampler.py):

    SamplingParams ─► SamplingState.add (once per request) ─► arrays (R,)
    rows that sample this step (N,) ─► metadata() ─► SamplingMetadata (N,) tensors

SamplingParams validated every field when the request was made; nothing here checks
them again. Token constraints (logit_bias, allowed_token_ids, bad_words) are rare, so
they live in a dict of the rows that have one and cost nothing when it is empty; the
grammar bitmask of constrained sequences comes from the engine with the step
(``SchedulerOutput.grammar_bitmask``) and is placed at the logits rows here.
Penalties need the token histories, which are gathered only on steps where some
sampling row uses a penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.core.outputs import GrammarBitmask
from pagedllm.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-step sampling settings of N rows (one row = one sampled token), as device tensors.

    Tensors a batch does not need are ``None`` so the sampler skips their work.
    """

    temperature: torch.Tensor  # (N,) float32; 0.0 on greedy rows
    all_greedy: bool
    all_random: bool
    vocab_size: int
    top_p: torch.Tensor | None = None  # (N,) float32; 1.0 = off
    top_k: torch.Tensor | None = None  # (N,) int64 in [1, V]; V = off
    min_p: torch.Tensor | None = None  # (N,) float32; 0.0 = off
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> its generator
    max_num_logprobs: int | None = None
    presence_penalties: torch.Tensor | None = None  # (N,) float32; 0.0 = off
    frequency_penalties: torch.Tensor | None = None  # (N,) float32; 0.0 = off
    repetition_penalties: torch.Tensor | None = None  # (N,) float32; 1.0 = off
    output_token_ids: torch.Tensor | None = None  # (N, max_output_len) int64, padded with V
    prompt_token_ids: torch.Tensor | None = None  # (N, max_prompt_len) int64, padded with V
    # (row ids, token ids), both (M,) int64: logits to set to -inf for min_tokens.
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    # Token constraints. allowed_token_mask: (row ids (K,), mask (K, V) bool, True = may be sampled).
    allowed_token_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    bad_words_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (row ids, token ids) (M,): -inf
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (row ids, token ids, bias) (M,)
    # Structured outputs: (N, ceil(V / 32)) int32, bit j of row i = token j allowed; only grammar_rows are masked.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] | None = None

    def add_grammar_bitmask(self, grammar: GrammarBitmask | None, req_ids: list[str],
                            num_sampled_tokens: np.ndarray) -> None:
        """Place the engine's bitmask rows (by request id) at this step's logits rows (in ``req_ids`` order)."""
        if grammar is None:
            return
        last_row = np.cumsum(num_sampled_tokens) - 1  # the logits row of each request's (last) sampled token
        row_of = {req_id: int(last_row[i]) for i, req_id in enumerate(req_ids) if num_sampled_tokens[i] > 0}
        present = [i for i, req_id in enumerate(grammar.req_ids) if req_id in row_of]
        if not present:
            return
        rows = [row_of[grammar.req_ids[i]] for i in present]
        bitmask = np.asarray(grammar.bitmask)
        full = np.full((self.num_rows, bitmask.shape[1]), -1, dtype=np.int32)  # -1: every token allowed
        full[rows] = bitmask[present]
        self.grammar_bitmask = _to_device(full, self.temperature.device)
        self.grammar_rows = rows

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def no_penalties(self) -> bool:
        return (self.presence_penalties is None and self.frequency_penalties is None
                and self.repetition_penalties is None)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: dict[int, torch.Generator],
        stop_ids_for_min_tokens: list[set[int]] | None,
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Metadata for rows given as lists (tests, memory profiling): a one-step ``SamplingState``.

        ``stop_ids_for_min_tokens[i]`` holds the ids (EOS and stop_token_ids) that
        row i may not sample while ``len(output_token_ids[i]) < params[i].min_tokens``;
        when the argument is None, ``params[i].all_stop_token_ids`` is used.
        """
        n = len(params)
        state = SamplingState(n, vocab_size)
        for row, p in enumerate(params):
            stops = stop_ids_for_min_tokens[row] if stop_ids_for_min_tokens is not None else None
            state.add(row, p, generators.get(row), stops)
        prompt_lens = np.array([len(t) for t in prompt_token_ids], dtype=np.int64)
        num_tokens = prompt_lens + np.array([len(t) for t in output_token_ids], dtype=np.int64)
        tokens = np.zeros((n, int(num_tokens.max(initial=0))), dtype=np.int32)
        for row, (prompt, out) in enumerate(zip(prompt_token_ids, output_token_ids)):
            tokens[row, :len(prompt)] = prompt
            tokens[row, len(prompt):num_tokens[row]] = out
        return state.metadata(np.arange(n), tokens, prompt_lens, num_tokens, torch.device(device))


class SamplingState:
    """Sampling settings of the persistent batch's rows, as numpy arrays of ``capacity`` rows.

    Off values make a row a no-op for that step: top_k = V, top_p = 1, min_p = 0,
    penalties 0 (1 for repetition), logprob counts -1.
    """

    _ARRAYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalties", "frequency_penalties",
               "repetition_penalties", "min_tokens", "num_logprobs", "num_prompt_logprobs")

    def __init__(self, capacity: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.temperature = np.zeros(capacity, dtype=np.float32)  # 0.0 = greedy
        self.top_p = np.ones(capacity, dtype=np.float32)
        self.top_k = np.full(capacity, vocab_size, dtype=np.int64)
        self.min_p = np.zeros(capacity, dtype=np.float32)
        self.presence_penalties = np.zeros(capacity, dtype=np.float32)
        self.frequency_penalties = np.zeros(capacity, dtype=np.float32)
        self.repetition_penalties = np.ones(capacity, dtype=np.float32)
        self.min_tokens = np.zeros(capacity, dtype=np.int64)
        self.num_logprobs = np.full(capacity, -1, dtype=np.int64)
        self.num_prompt_logprobs = np.full(capacity, -1, dtype=np.int64)
        self.generators: dict[int, torch.Generator] = {}  # row -> generator of a seeded request
        # Per row: its params, read for the stop ids of min_tokens (the engine may add EOS to
        # params.all_stop_token_ids after the request was made), or explicit stop ids.
        self.params: list[SamplingParams | None] = [None] * capacity
        self.stop_ids: list[set[int] | None] = [None] * capacity
        # Rows with logit_bias, allowed_token_ids or bad_words: most batches have none.
        self.token_rules: dict[int, _TokenRules] = {}
        # Per setting: how many occupied rows have it on. A step skips the gather (and the
        # device copy) of a setting no row uses: most batches are all greedy, no penalties,
        # no logprobs, and a batch-1 decode step's host work is on the critical path.
        self.num_on: dict[str, int] = dict.fromkeys(self._ARRAYS, 0)
        # The value that makes each setting a no-op (temperature: 0.0 = greedy).
        self._off_values: dict[str, float] = {
            **dict.fromkeys(self._ARRAYS, 0.0), "top_p": 1.0, "top_k": vocab_size, "repetition_penalties": 1.0,
            "num_logprobs": -1, "num_prompt_logprobs": -1}

    def _off(self, name: str) -> float:
        return self._off_values[name]

    def _count(self, row: int, sign: int) -> None:
        for name in self._ARRAYS:
            if getattr(self, name)[row] != self._off(name):
                self.num_on[name] += sign

    def _clear(self, row: int) -> None:
        for name in self._ARRAYS:
            getattr(self, name)[row] = self._off(name)

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` rows, keeping every row's settings."""
        fresh = SamplingState(capacity, self.vocab_size)
        old = len(self.params)
        for name in self._ARRAYS:
            getattr(fresh, name)[:old] = getattr(self, name)
            setattr(self, name, getattr(fresh, name))
        self.params.extend([None] * (capacity - old))
        self.stop_ids.extend([None] * (capacity - old))

    def add(self, row: int, params: SamplingParams, generator: torch.Generator | None = None,
            stop_ids: set[int] | None = None) -> None:
        """Fill ``row`` from ``params`` (validated by SamplingParams)."""
        if self.params[row] is not None:
            self.remove(row)
        v = self.vocab_size
        self.temperature[row] = 0.0 if params.greedy else params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k if 0 < params.top_k < v else v
        self.min_p[row] = params.min_p
        self.presence_penalties[row] = params.presence_penalty
        self.frequency_penalties[row] = params.frequency_penalty
        self.repetition_penalties[row] = params.repetition_penalty
        self.min_tokens[row] = params.min_tokens
        self.num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self.num_prompt_logprobs[row] = -1 if params.prompt_logprobs is None else params.prompt_logprobs
        self.params[row] = params
        self.stop_ids[row] = stop_ids
        self._count(row, +1)
        rules = _TokenRules.of(params, v)
        if rules is not None:
            self.token_rules[row] = rules
        if generator is not None:
            self.generators[row] = generator
        else:
            self.generators.pop(row, None)

    def move(self, src: int, dst: int) -> None:
        """Move row ``src`` to row ``dst`` (condensing the batch); ``src`` becomes empty."""
        for name in self._ARRAYS:
            arr = getattr(self, name)
            arr[dst] = arr[src]
        self._clear(src)
        self.params[dst], self.params[src] = self.params[src], None
        self.stop_ids[dst], self.stop_ids[src] = self.stop_ids[src], None
        self.token_rules.pop(dst, None)
        rules = self.token_rules.pop(src, None)
        if rules is not None:
            self.token_rules[dst] = rules
        self.generators.pop(dst, None)
        gen = self.generators.pop(src, None)
        if gen is not None:
            self.generators[dst] = gen

    def remove(self, row: int) -> None:
        if self.params[row] is not None:
            self._count(row, -1)
            self._clear(row)
        self.params[row] = self.stop_ids[row] = None
        self.token_rules.pop(row, None)
        self.generators.pop(row, None)

    def metadata(self, rows: np.ndarray, token_ids: np.ndarray, num_prompt_tokens: np.ndarray,
                 num_tokens: np.ndarray, device: torch.device,
                 num_draft_tokens_before: np.ndarray | None = None) -> SamplingMetadata:
        """Device tensors for the N sampling rows ``rows`` (N,) of this step, in that order.

        ``token_ids`` (R, W) holds each row's prompt then output tokens, ``num_prompt_tokens``
        and ``num_tokens`` (R,) their lengths; they are read only when a row uses a penalty.
        ``num_draft_tokens_before`` (N,): speculative decoding, the drafts (written after the
        row's tokens) that precede each entry's position; they count as output for
        penalties and min_tokens, as they would had they been sampled one step at a time.
        """
        on = self.num_on
        temperature = self.temperature[rows]
        if on["temperature"]:
            greedy = temperature == 0.0  # add() stores 0.0 for every greedy row
            all_greedy, all_random = bool(greedy.all()), not greedy.any()
        else:
            greedy, all_greedy, all_random = None, True, False
        md = SamplingMetadata(temperature=_to_device(temperature, device), all_greedy=all_greedy,
                              all_random=all_random, vocab_size=self.vocab_size)
        if not all_greedy:  # filters only matter on rows that sample; greedy rows ignore them
            for name in ("top_k", "top_p", "min_p"):
                if on[name]:
                    values = getattr(self, name)[rows]
                    if (values[~greedy] != self._off(name)).any():
                        setattr(md, name, _to_device(values, device))
        if on["num_logprobs"]:
            max_logprobs = int(self.num_logprobs[rows].max(initial=-1))
            md.max_num_logprobs = max_logprobs if max_logprobs >= 0 else None
        if self.generators:
            # Several entries of ``rows`` may share a row (several tokens): each draws in turn.
            seeded = np.flatnonzero(np.isin(rows, np.fromiter(self.generators, np.int64)))
            md.generators = {int(i): self.generators[int(rows[i])] for i in seeded}
        if on["presence_penalties"] or on["frequency_penalties"] or on["repetition_penalties"] or on["min_tokens"]:
            prompt_lens = num_prompt_tokens[rows].astype(np.int64)
            output_lens = num_tokens[rows].astype(np.int64) - prompt_lens
            if num_draft_tokens_before is not None:  # --- speculative decoding ---
                output_lens = output_lens + num_draft_tokens_before
            self._penalties(md, rows, token_ids, prompt_lens, output_lens, device)
            if on["min_tokens"]:
                md.min_tokens_mask = self._min_tokens_mask(rows, output_lens, device)
        if self.token_rules:
            self._token_rules(md, rows, token_ids, num_prompt_tokens, num_tokens, device)
        return md

    def _token_rules(self, md: SamplingMetadata, rows: np.ndarray, token_ids: np.ndarray,
                     num_prompt_tokens: np.ndarray, num_tokens: np.ndarray, device: torch.device) -> None:
        """logit_bias, allowed_token_ids and bad_words of the sampling rows that have them."""
        allowed_rows: list[int] = []
        allowed_masks: list[np.ndarray] = []
        bias_rows, bias_ids, bias_values, bad_rows, bad_ids = [], [], [], [], []
        for i, row in enumerate(rows.tolist()):
            rules = self.token_rules.get(row)
            if rules is None:
                continue
            if rules.allowed_mask is not None:
                allowed_rows.append(i)
                allowed_masks.append(rules.allowed_mask)
            if rules.bias_ids is not None:
                bias_rows.extend([i] * len(rules.bias_ids))
                bias_ids.extend(rules.bias_ids)
                bias_values.extend(rules.bias_values)
            if rules.bad_words:
                output = token_ids[row, num_prompt_tokens[row]:num_tokens[row]].tolist()
                banned = rules.banned_next(output)
                bad_rows.extend([i] * len(banned))
                bad_ids.extend(banned)
        if allowed_rows:
            md.allowed_token_mask = (_to_device(np.array(allowed_rows, np.int64), device),
                                     _to_device(np.stack(allowed_masks), device))
        if bias_rows:
            md.logit_bias = (_to_device(np.array(bias_rows, np.int64), device),
                             _to_device(np.array(bias_ids, np.int64), device),
                             _to_device(np.array(bias_values, np.float32), device))
        if bad_rows:
            md.bad_words_mask = (_to_device(np.array(bad_rows, np.int64), device),
                                 _to_device(np.array(bad_ids, np.int64), device))

    def _penalties(self, md: SamplingMetadata, rows: np.ndarray, token_ids: np.ndarray, prompt_lens: np.ndarray,
                   output_lens: np.ndarray, device: torch.device) -> None:
        for name in ("presence_penalties", "frequency_penalties", "repetition_penalties"):
            if self.num_on[name]:
                values = getattr(self, name)[rows]
                if (values != self._off(name)).any():
                    setattr(md, name, _to_device(values, device))
        if md.no_penalties:
            return
        v = self.vocab_size
        if md.repetition_penalties is not None:
            # Repetition penalty (as in HF and vLLM) also covers the prompt's tokens.
            md.prompt_token_ids = _to_device(_gather_padded(token_ids, rows, 0, prompt_lens, v), device)
        md.output_token_ids = _to_device(_gather_padded(token_ids, rows, prompt_lens, output_lens, v), device)

    def _min_tokens_mask(self, rows: np.ndarray, output_lens: np.ndarray,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        below = np.flatnonzero(output_lens < self.min_tokens[rows])
        if not len(below):
            return None
        mask_rows: list[int] = []
        cols: list[int] = []
        for i in below.tolist():
            row = int(rows[i])
            stops = self.stop_ids[row]
            # The engine puts EOS (unless ignore_eos) into all_stop_token_ids. An id outside the
            # vocabulary (a user's stop_token_ids) can never be sampled anyway.
            ids = [t for t in (stops if stops is not None else self.params[row].all_stop_token_ids)
                   if t < self.vocab_size]
            mask_rows.extend([i] * len(ids))
            cols.extend(ids)
        if not mask_rows:
            return None
        return (_to_device(np.array(mask_rows, dtype=np.int64), device),
                _to_device(np.array(cols, dtype=np.int64), device))


@dataclass
class _TokenRules:
    """One row's token constraints, prepared once when the request joins the batch."""

    allowed_mask: np.ndarray | None  # (V,) bool
    bias_ids: list[int] | None
    bias_values: list[float] | None
    bad_words: list[list[int]]  # token id sequences

    @classmethod
    def of(cls, params: SamplingParams, vocab_size: int) -> _TokenRules | None:
        bad_words = getattr(params, "bad_words_token_ids", [])
        if params.logit_bias is None and params.allowed_token_ids is None and not bad_words:
            return None
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = np.zeros(vocab_size, dtype=bool)
            allowed[[t for t in params.allowed_token_ids if t < vocab_size]] = True
        bias = {t: b for t, b in (params.logit_bias or {}).items() if t < vocab_size}
        return cls(allowed, list(bias) or None, list(bias.values()) or None, bad_words)

    def banned_next(self, output: list[int]) -> list[int]:
        """Last tokens of the bad words whose other tokens the output just ended with."""
        banned = []
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or output[len(output) - len(prefix):] == prefix:
                banned.append(word[-1])
        return banned


def _gather_padded(token_ids: np.ndarray, rows: np.ndarray, starts: np.ndarray | int, lens: np.ndarray,
                   pad: int) -> np.ndarray:
    """(N, max(lens)) int64: ``token_ids[rows[i], starts[i]:starts[i] + lens[i]]`` padded with ``pad``."""
    max_len = int(lens.max(initial=0))
    offsets = np.arange(max_len)
    cols = np.minimum(np.asarray(starts).reshape(-1, 1) + offsets, max(token_ids.shape[1] - 1, 0))
    out = token_ids[rows[:, None], cols].astype(np.int64) if max_len else np.zeros((len(rows), 0), np.int64)
    out[offsets >= lens[:, None]] = pad
    return out


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; through pinned memory on CUDA so the copy is asynchronous."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

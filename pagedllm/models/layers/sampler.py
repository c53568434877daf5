"""Batched sampler: turns the last-position logits of N sequences into N next tokens.

This module owns everything between the model's logits and the sampled token
ids: the per-batch ``SamplingMetadata`` (built once per step from each row's
``SamplingParams``), the logits processors, the random draw and the logprobs.
It follows vLLM v1's sampler, in this order::

    logits (N, V) ──► raw logprobs (log_softmax, only if requested)
        │
        ├─► penalties (repetition on prompt+output, presence/frequency on output)
        ├─► min_tokens mask (stop/EOS ids -> -inf until min_tokens is reached)
        ├─► greedy argmax ─────────────────────────────────────────┐
        ├─► temperature ─► min_p ─► top_k ─► top_p ─► random draw ──┤ where(greedy)
        ▼                                                          ▼
                                                  sampled_token_ids (N,)

The random draw is the exponential race: ``argmax(probs / E)`` with
``E ~ Exp(1)`` i.i.d. picks index i with probability ``probs[i]``, so sampling
needs no CDF search, no Python loop over the vocabulary and no host sync.
Unseeded rows share one ``exponential_()`` call; each seeded row draws its
noise from its own ``torch.Generator``, so a seeded request gets the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import nn

from pagedllm.sampling_params import SamplingParams

# Temperatures below this are greedy (matches SamplingParams.greedy).
_SAMPLING_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """Per-step sampling settings of N rows (one row = one sequence), as device tensors.

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
        """Build the batch tensors from each row's params and tokens so far.

        ``stop_ids_for_min_tokens[i]`` holds the ids (EOS and stop_token_ids) that
        row i may not sample while ``len(output_token_ids[i]) < params[i].min_tokens``;
        when the argument is None, ``params[i].all_stop_token_ids`` is used.
        """
        device = torch.device(device)
        _validate_build_args(params, prompt_token_ids, output_token_ids, generators,
                             stop_ids_for_min_tokens, vocab_size, device)
        greedy = [p.greedy for p in params]
        random_params = [p for p, g in zip(params, greedy) if not g]
        md = cls(
            temperature=_tensor([0.0 if g else float(p.temperature) for p, g in zip(params, greedy)],
                                torch.float32, device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            vocab_size=vocab_size,
            generators=dict(generators),
        )
        # Filters only matter on rows that sample; greedy rows ignore them.
        if any(0 < p.top_k < vocab_size for p in random_params):
            md.top_k = _tensor(
                [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], torch.int64, device)
        if any(p.top_p < 1.0 for p in random_params):
            md.top_p = _tensor([p.top_p for p in params], torch.float32, device)
        if any(p.min_p > 0.0 for p in random_params):
            md.min_p = _tensor([p.min_p for p in params], torch.float32, device)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        md.max_num_logprobs = max(logprobs) if logprobs else None
        md._build_penalties(params, prompt_token_ids, output_token_ids, device)
        md.min_tokens_mask = _build_min_tokens_mask(params, output_token_ids, stop_ids_for_min_tokens,
                                                    vocab_size, device)
        return md

    def _build_penalties(self, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                         output_token_ids: list[list[int]], device: torch.device) -> None:
        v = self.vocab_size
        if any(p.presence_penalty != 0.0 for p in params):
            self.presence_penalties = _tensor(
                [p.presence_penalty for p in params], torch.float32, device)
        if any(p.frequency_penalty != 0.0 for p in params):
            self.frequency_penalties = _tensor(
                [p.frequency_penalty for p in params], torch.float32, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            self.repetition_penalties = _tensor(
                [p.repetition_penalty for p in params], torch.float32, device)
            # Repetition penalty (as in HF and vLLM) also covers the prompt's tokens.
            self.prompt_token_ids = _to_device(_pad_token_ids(prompt_token_ids, v, "prompt_token_ids"), device)
        if not self.no_penalties:
            self.output_token_ids = _to_device(_pad_token_ids(output_token_ids, v, "output_token_ids"), device)


@dataclass
class SamplerOutput:
    """What the sampler returns for N rows.

    When logprobs were requested (K = ``max_num_logprobs``), column 0 holds the
    sampled token and columns 1..K the K most likely tokens of the raw model
    distribution; rows that asked for fewer than K are sliced by the caller.
    """

    sampled_token_ids: torch.Tensor  # (N,) int64
    logprob_token_ids: torch.Tensor | None = None  # (N, K+1) int64
    logprobs: torch.Tensor | None = None  # (N, K+1) float32
    sampled_ranks: torch.Tensor | None = None  # (N,) int64; 1 = most likely


class Sampler(nn.Module):
    """Samples one token per row; see the module docstring for the order of operations.

    ``logits`` is not modified. Logprobs come from the raw logits (before
    penalties and temperature), as vLLM v1 reports them by default.
    """

    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        # logits: (N, V)
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if md.max_num_logprobs is not None else None

        if not md.no_penalties:
            logits = apply_penalties(logits, md)
        if md.min_tokens_mask is not None:
            # Out-of-place: the caller's logits stay untouched.
            logits = logits.index_put(md.min_tokens_mask, torch.tensor(float("-inf"), device=logits.device))

        sampled = self._sample(logits, md)
        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = gather_logprobs(
                raw_logprobs, md.max_num_logprobs, sampled)
        return out

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        greedy = None if md.all_random else logits.argmax(dim=-1)  # (N,)
        if md.all_greedy:
            return greedy
        # Greedy rows divide by 1 so they stay finite; their result is replaced below.
        is_greedy = md.temperature < _SAMPLING_EPS
        temperature = torch.where(is_greedy, 1.0, md.temperature)
        logits = logits / temperature.unsqueeze(1)  # new tensor: the filters below work in place
        if md.min_p is not None:
            apply_min_p(logits, md.min_p)
        if md.top_k is not None or md.top_p is not None:
            apply_top_k_top_p(logits, md.top_k, md.top_p)
        sampled = random_sample(logits.softmax(dim=-1), md.generators)
        if greedy is None:
            return sampled
        return torch.where(is_greedy, greedy, sampled)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Return penalized logits (N, V): repetition (prompt + output), then frequency and presence (output)."""
    num_rows, v = logits.shape
    output_counts = _token_counts(md.output_token_ids, num_rows, v)  # (N, V)
    output_mask = output_counts > 0
    if md.repetition_penalties is not None:
        seen = output_mask | (_token_counts(md.prompt_token_ids, num_rows, v) > 0)
        # Tokens not seen get penalty 1 (no change). Dividing positive logits and
        # multiplying negative ones both make a seen token less likely.
        penalty = torch.where(seen, md.repetition_penalties.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if md.frequency_penalties is not None:
        logits = logits - md.frequency_penalties.unsqueeze(1) * output_counts
    if md.presence_penalties is not None:
        logits = logits - md.presence_penalties.unsqueeze(1) * output_mask
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drop tokens whose probability is below ``min_p * max probability`` of their row."""
    probs = logits.softmax(dim=-1)  # (N, V)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # (N, 1)
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> None:
    """In place: keep each row's k largest logits, then the smallest set of those with mass >= p.

    One ascending sort serves both filters. ``k`` is (N,) in [1, V]; ``p`` is (N,) in (0, 1].
    Ties with the k-th largest value are kept, as in vLLM.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (N, V) each
    if k is not None:
        v = logits.shape[1]
        kth_largest = sorted_logits.gather(1, (v - k).unsqueeze(1))  # (N, 1)
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if p is not None:
        # Ascending cumulative mass: a token is dropped when it and every token below
        # it together hold no more than 1 - p. The largest token always stays.
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum_probs <= (1.0 - p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one index per row of ``probs`` (N, V) with ``argmax(probs / Exp(1))``.

    ``probs`` is overwritten. Unseeded rows share one draw from the default
    generator; each row in ``generators`` redraws its own noise from its generator.
    """
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.exponential_()
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    # A zero draw would make 0/0 = NaN on a filtered token, and argmax picks NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (ids (N, K+1), logprobs (N, K+1), ranks (N,)): the sampled token, then the top K."""
    token_ids = token_ids.unsqueeze(1)  # (N, 1)
    sampled_logprobs = logprobs.gather(1, token_ids)  # (N, 1)
    # Rank 1 = most likely; every token at least as likely as the sampled one counts.
    ranks = (logprobs >= sampled_logprobs).sum(dim=-1)
    if num_logprobs == 0:
        return token_ids, sampled_logprobs, ranks
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # (N, K)
    return (torch.cat([token_ids, top_ids], dim=1), torch.cat([sampled_logprobs, top_logprobs], dim=1),
            ranks)


def _token_counts(token_ids: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """Count each token per row: (N, L) ids padded with V -> (N, V) float32 counts."""
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]  # the extra column collected the padding


def _pad_token_ids(rows: list[list[int]], vocab_size: int, name: str) -> torch.Tensor:
    """Pack ragged token lists into one (N, max_len) int64 CPU tensor padded with ``vocab_size``.

    One flat tensor and one masked assignment, so no per-row tensor is made.
    """
    lens = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    max_len = int(lens.max()) if len(rows) else 0
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"{name} must hold token ids in [0, {vocab_size})")
    padded = torch.full((len(rows), max_len), vocab_size, dtype=torch.int64)
    # Row-major boolean indexing fills the valid slots in the order of ``flat``.
    padded[torch.arange(max_len) < lens.unsqueeze(1)] = flat
    return padded


def _build_min_tokens_mask(
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    stop_ids: list[set[int]] | None,
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows: list[int] = []
    cols: list[int] = []
    for i, (p, out) in enumerate(zip(params, output_token_ids)):
        if len(out) >= p.min_tokens:
            continue
        # An id outside the vocabulary (a user's stop_token_ids) can never be sampled anyway.
        ids = [t for t in (stop_ids[i] if stop_ids is not None else p.all_stop_token_ids) if t < vocab_size]
        rows.extend([i] * len(ids))
        cols.extend(ids)
    if not rows:
        return None
    return _tensor(rows, torch.int64, device), _tensor(cols, torch.int64, device)


def _validate_build_args(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    generators: dict[int, torch.Generator],
    stop_ids_for_min_tokens: list[set[int]] | None,
    vocab_size: int,
    device: torch.device,
) -> None:
    n = len(params)
    if n == 0:
        raise ValueError("params must hold at least one row")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    for name, value in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids),
                        ("stop_ids_for_min_tokens", stop_ids_for_min_tokens)):
        if value is not None and len(value) != n:
            raise ValueError(f"{name} must have one entry per row ({n}), got {len(value)}")
    for row, gen in generators.items():
        if not 0 <= row < n:
            raise ValueError(f"generators has row {row}, outside [0, {n})")
        if gen.device.type != device.type:
            raise ValueError(f"generators[{row}] is on {gen.device}, the batch on {device}")


def _tensor(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; through pinned memory on CUDA so the copy is asynchronous."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

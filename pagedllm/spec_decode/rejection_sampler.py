"""Rejection sampler: verifies draft tokens so the output is distributed exactly as the target's.

A request with k drafts d1..dk has k+1 target rows in the batch (the logits after
its last token and after each draft). With p_i the target's processed distribution
at row i (penalties, min_tokens, temperature, min-p, top-k, top-p: the same steps
as models/layers/sampler.py) and q_i the draft's (a point mass on d_i for n-gram
drafts), for i = 1..k in order:

    accept d_i  with probability min(1, p_i(d_i) / q_i(d_i))
    on the first rejection emit x ~ normalize(max(0, p_i - q_i)) and stop
    if all k are accepted, emit a bonus token x ~ p_{k+1}

Each emitted token is then distributed as p_i (Leviathan et al. 2023, Chen et al.
2023), so speculation changes latency, never the output distribution. Greedy rows
accept while the draft equals the argmax and emit the argmax. Everything is batched
over the flat rows, with one host sync to read (accepted, sampled) back.

Randomness: the residual and bonus draws reuse the sampler's exponential race
(``random_sample``), then one uniform per row decides acceptance; a seeded row
draws both from its request's generator, so a seeded request is reproducible.
Logprobs are those of the raw target distribution at each emitted token, as the
plain sampler reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.outputs import LogprobsLists
from pagedllm.models.layers.sampler import (
    _SAMPLING_EPS,
    apply_grammar_bitmask,
    apply_logits_processors,
    apply_min_p,
    apply_top_k_top_p,
    gather_logprobs,
    greedy_ids,
    random_sample,
)
from pagedllm.worker.sampling_metadata import SamplingMetadata


@dataclass
class VerifyOutput:
    """Per request, in input order: the tokens it emits (accepted drafts, then one sampled token)."""

    token_ids: list[list[int]]
    logprobs: list[LogprobsLists] | None = None  # per request, when some row asked for logprobs


def target_probs(logits: torch.Tensor, md: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(greedy argmax (N,), processed probabilities (N, V) or None when every row is greedy).

    The plain sampler's steps in its order, so a row's p is what it would sample from."""
    logits = logits.float()
    if md.grammar_bitmask is not None:  # rows of requests with a grammar (they carry no drafts)
        apply_grammar_bitmask(logits, md.grammar_bitmask, md.grammar_rows)
    logits = apply_logits_processors(logits, md)
    greedy = greedy_ids(logits)
    if md.all_greedy:
        return greedy, None
    temperature = torch.where(md.temperature < _SAMPLING_EPS, 1.0, md.temperature)
    logits = logits / temperature.unsqueeze(1)
    if md.min_p is not None:
        apply_min_p(logits, md.min_p)
    if md.top_k is not None or md.top_p is not None:
        apply_top_k_top_p(logits, md.top_k, md.top_p)
    return greedy, logits.softmax(dim=-1)


class RejectionSampler:
    """Verifies the drafts of a batch of requests; see the module docstring."""

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata, draft_ids: np.ndarray,
                 num_rows: np.ndarray, draft_probs: torch.Tensor | None = None) -> VerifyOutput:
        """Verify one step's drafts.

        logits      (T, V) raw target logits, request by request, k_r + 1 rows each
        md          SamplingMetadata of those T rows (one entry per row, seeded rows share a generator)
        draft_ids   (T,) int64: the draft each row verifies; -1 on each request's last (bonus) row
        num_rows    (R,) int64: k_r + 1 per request
        draft_probs (T, V) the draft model's distributions (rows of bonus positions unused);
                    None for point-mass drafts (n-gram)
        """
        device = logits.device
        drafts = torch.from_numpy(np.maximum(draft_ids, 0)).to(device)  # (T,)
        greedy, probs = target_probs(logits, md)
        accepted = greedy == drafts
        sampled = greedy
        if probs is not None:
            rand_accepted, rand_sampled = _accept_and_resample(probs, drafts, draft_ids >= 0, draft_probs,
                                                               md.generators)
            is_greedy = md.temperature < _SAMPLING_EPS
            accepted = torch.where(is_greedy, accepted, rand_accepted)
            sampled = torch.where(is_greedy, sampled, rand_sampled)
        accepted_np = accepted.cpu().numpy()  # the step's one host sync (with the next line)
        sampled_np = sampled.cpu().numpy()
        token_ids, emitted = _emitted_tokens(draft_ids, num_rows, accepted_np, sampled_np)
        out = VerifyOutput(token_ids)
        if md.max_num_logprobs is not None:
            out.logprobs = _emitted_logprobs(logits, md.max_num_logprobs, emitted, token_ids, num_rows)
        return out


def _accept_and_resample(probs: torch.Tensor, drafts: torch.Tensor, is_draft_np: np.ndarray,
                         draft_probs: torch.Tensor | None, generators: dict[int, torch.Generator]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted (T,), sampled (T,)): the acceptance test of each draft row, and the token each
    row would emit: from the residual on draft rows, from p itself on bonus rows."""
    is_draft = torch.from_numpy(is_draft_np).to(probs.device)
    p_draft = probs.gather(1, drafts.unsqueeze(1)).squeeze(1)  # (T,) p_i(d_i)
    if draft_probs is None:  # point mass: q(d) = 1, residual = p without d
        q_draft = torch.ones_like(p_draft)
        residual = probs.scatter(1, drafts.unsqueeze(1), 0.0)
    else:
        q_draft = draft_probs.gather(1, drafts.unsqueeze(1)).squeeze(1)
        residual = (probs - draft_probs).clamp_min_(0.0)
    # A residual of zero mass means p == q there: acceptance is certain, the draw is never used.
    sample_from = torch.where(is_draft.unsqueeze(1), residual, probs)
    sampled = random_sample(sample_from, generators)  # overwrites sample_from
    uniform = torch.rand(probs.shape[0], device=probs.device)
    for row, gen in generators.items():
        uniform[row] = torch.rand(1, generator=gen, device=probs.device)[0]
    # u < p/q without dividing (q may be 0 where the draft was impossible for its own model).
    accepted = (uniform * q_draft < p_draft) & is_draft
    return accepted, sampled


def _emitted_tokens(draft_ids: np.ndarray, num_rows: np.ndarray, accepted: np.ndarray,
                    sampled: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Per request: accepted drafts up to the first rejection, then that row's sampled token.
    Also the (T,) array of the token each row emitted (-1 on rows past a rejection)."""
    emitted = np.full(len(draft_ids), -1, dtype=np.int64)
    token_ids = []
    start = 0
    for n in num_rows.tolist():
        k = n - 1
        rejected = np.flatnonzero(~accepted[start:start + k])
        m = int(rejected[0]) if rejected.size else k
        emitted[start:start + m] = draft_ids[start:start + m]
        emitted[start + m] = sampled[start + m]
        token_ids.append(emitted[start:start + m + 1].tolist())
        start += n
    return token_ids, emitted


def _emitted_logprobs(logits: torch.Tensor, num_logprobs: int, emitted: np.ndarray,
                      token_ids: list[list[int]], num_rows: np.ndarray) -> list[LogprobsLists]:
    """The raw target logprobs of each emitted token (and the top ``num_logprobs``), per request."""
    raw = logits.float().log_softmax(dim=-1)
    ids, lps, ranks = gather_logprobs(raw, num_logprobs, torch.from_numpy(np.maximum(emitted, 0)).to(raw.device))
    ids, lps, ranks = ids.tolist(), lps.tolist(), ranks.tolist()
    out = []
    start = 0
    for n, toks in zip(num_rows.tolist(), token_ids):
        rows = range(start, start + len(toks))
        out.append(LogprobsLists([ids[r] for r in rows], [lps[r] for r in rows], [ranks[r] for r in rows]))
        start += n
    return out

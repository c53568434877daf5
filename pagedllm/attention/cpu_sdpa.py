"""The CPU attention backend: torch's fused scaled-dot-product attention over the paged cache.

The reference backend (torch_ref.py) spells attention out as ~10 torch ops per
sequence (two matmuls, mask, softmax, casts, GQA reshapes). On the CPU each op
is a dispatch plus a pass over memory, so this backend hands the same work to
``F.scaled_dot_product_attention`` (one fused, multi-threaded flash kernel on
CPU, GQA included through ``enable_gqa``) and keeps the per-layer work to a
minimum. Everything that depends only on the step, not on the layer, is worked
out once per step (``_StepPlan``, built by the first layer and reused by the
others, which see the same ``AttentionMetadata``): which cache rows the new K/V
go to, which rows each sequence reads, the masks. A layer then costs

- two ``index_copy_`` of the step's new K/V into a flat view of the cache
  (``(num_blocks * 2 * block_size, kvh, d)``: K of slot s is row
  ``(s // bs) * 2 * bs + s % bs``, its V ``block_size`` rows further);
- for a fresh prefill (the whole context is in this step), SDPA over the step's
  own K/V with ``is_causal`` (rounded to the cache's dtype first, as a read would
  give them): nothing is read back from the cache;
- for all short queries together (decodes, and up to ``SHORT_QUERY`` new tokens
  after cached context: a speculative verification), one ``index_select`` of
  their K and V rows and one SDPA call in which every query token attends alone
  (``_ShortQueries``);
- for a longer chunk after cached context (chunked or prefix-cached prefill), one
  ``index_select`` of its context and SDPA with the causal mask of its last
  ``q_len`` positions.

Short queries give the same numbers whatever else is in the step. SDPA's CPU
kernel sums over the keys in vector lanes plus a scalar tail, so a context padded
to a different length (a longer sequence in the batch) and a query block of a
different size both change the rounding, and a greedy path can part at a near-tie
(with bf16 weights, whose inputs are rounded, often). So every context is padded
to a multiple of ``PAD`` keys (the masked tail adds exact zeros), and the tokens of
a sequence go into SDPA's heads dimension, each a one-token query with its own key
mask, not into its query dimension: a verified draft is computed exactly as the
plain decode at its position would be (speculative decoding's greedy output equals
plain decoding's, tests/spec_decode), and a decode does not depend on its batch.

Same interface as the reference; tests/cpu/test_cpu_attention.py checks it against
torch_ref and checks the guarantees above bit for bit. With an fp32 cache it computes
in fp32; over a bf16 cache (the CPU fast path) in bf16 (``_attention_dtype``): the
query is rounded to bf16 and SDPA's bf16 kernel rounds its probabilities before
multiplying by V (accumulating in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, as_kv_dtype, kv_bytes
from pagedllm.attention.torch_ref import _host_list

# Contexts of short queries are padded to a multiple of this many keys (a multiple of every CPU vector width).
PAD = 16
# New tokens after cached context up to which each token attends alone (speculative verification is k + 1).
SHORT_QUERY = 16


@dataclass
class _Reads:
    """Cache rows some queries read: ``rows`` (2 * n * length,) = K rows of n contexts of ``length``
    positions each, then their V rows; ``mask`` (n or 1, 1, q, length) bool or None (attend to all)."""

    rows: torch.Tensor
    n: int
    length: int
    mask: torch.Tensor | None


@dataclass
class _ShortQueries:
    """n sequences with cached context and 1..``SHORT_QUERY`` new tokens each, ``width`` slots per sequence
    (the most tokens of any; a shorter one repeats its last token, whose output is dropped). In SDPA a
    sequence is one batch row whose heads dimension holds (head, token) pairs, each a one-token query
    over the sequence's context with its own key mask; GQA's head grouping still maps each pair to its
    head's K/V head."""

    reads: _Reads  # the n contexts, padded to a multiple of PAD; mask (n, 1, width, length) or None
    width: int
    q_index: torch.Tensor | None  # (n * width,) the query row of each slot; None: rows 0 .. n*width-1
    valid: torch.Tensor | None  # (tokens,) the slots that are real tokens, in token order; None: all
    tokens: torch.Tensor | None  # (tokens,) their query rows; None: 0 .. n*width-1
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # per head count: (n, h*width, 1, length)

    def mask(self, num_heads: int) -> torch.Tensor | None:
        """The key mask of every (head, token) pair, built by the first layer of the step."""
        mask = self.reads.mask
        if mask is None or self.width == 1:
            return mask
        if num_heads not in self.masks:
            n, length = self.reads.n, self.reads.length
            self.masks[num_heads] = mask.expand(n, num_heads, self.width, length).reshape(
                n, num_heads * self.width, 1, length)
        return self.masks[num_heads]


@dataclass
class _StepPlan:
    """What every layer of one step does, worked out once (see the module docstring)."""

    write_rows: torch.Tensor | None  # (tokens written,) K rows of the step's new K/V; None: no cache
    write_keep: torch.Tensor | None  # (num_tokens,) bool when padding tokens (slot -1) are skipped
    fresh: list[tuple[int, int]] = field(default_factory=list)  # (lo, hi) token ranges of fresh prefills
    chunks: list[tuple[int, int, _Reads]] = field(default_factory=list)  # prefills after cached context
    zero: list[tuple[int, int]] = field(default_factory=list)  # sequences' token ranges with nothing to attend
    num_tokens: int = 0  # tokens of the sequences; rows past them are padding (CUDA-graph style), zeroed
    short: _ShortQueries | None = None  # decodes and verifications
    short_only: bool = False  # short queries are the step's only tokens, in order: SDPA's output is the output


class CpuSdpaAttentionBackend(AttentionBackend):
    """Paged attention through ``F.scaled_dot_product_attention`` (the default on CPU)."""

    name = "cpu_sdpa"

    def __init__(self) -> None:
        # The plan of the step whose metadata the layers are being called with (held, so no other
        # step's metadata can reuse its id), and the cache shape it was made for.
        self._plan_metadata: AttentionMetadata | None = None
        self._plan_cache: tuple[int, bool] = (0, False)
        self._plan: _StepPlan | None = None

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        has_cache = kv_cache.numel() > 0
        plan = self._plan_for(metadata, kv_cache.shape[2] if has_cache else 0, has_cache)
        flat = None
        if has_cache:
            num_blocks, _, block_size, num_kv_heads, head_dim = kv_cache.shape
            flat = kv_bytes(kv_cache).view(num_blocks * 2 * block_size, num_kv_heads, head_dim)
            _write(flat, key, value, plan, block_size, kv_cache)
        if plan.short_only and query.shape[0] == plan.num_tokens:  # no padding rows either
            return _attend_short(query, flat, kv_cache, plan.short, scale)
        output = torch.empty_like(query)
        for lo, hi in plan.zero:
            output[lo:hi] = 0
        output[plan.num_tokens:] = 0
        if plan.fresh and has_cache and kv_cache.dtype != key.dtype:
            # A fresh prefill attends to its K/V as the cache holds them (rounded to bf16 / fp8), as every
            # later read does: a prompt then gives the same tokens whether its context was computed in this
            # step, in earlier chunks, or found in the prefix cache.
            key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)  # _sdpa widens fp8 to the query's
        for lo, hi in plan.fresh:
            output[lo:hi] = _sdpa(query[lo:hi], key[lo:hi], value[lo:hi], scale, causal=True)
        for lo, hi, reads in plan.chunks:
            output[lo:hi] = _attend(query[lo:hi].transpose(0, 1)[None], flat, kv_cache, reads, scale)[0] \
                .transpose(0, 1)
        short = plan.short
        if short is not None:
            out = _attend_short(query, flat, kv_cache, short, scale)
            if short.valid is not None:
                out = out[short.valid]
            if short.tokens is None:
                output[:out.shape[0]] = out
            else:
                output[short.tokens] = out
        return output

    def _plan_for(self, metadata: AttentionMetadata, block_size: int, has_cache: bool) -> _StepPlan:
        if metadata is not self._plan_metadata or self._plan_cache != (block_size, has_cache):
            self._plan = _make_plan(metadata, block_size, has_cache)
            self._plan_metadata, self._plan_cache = metadata, (block_size, has_cache)
        return self._plan


def _make_plan(metadata: AttentionMetadata, block_size: int, has_cache: bool) -> _StepPlan:
    seq_lens = _host_list(metadata.seq_lens_cpu, metadata.seq_lens)
    starts = _host_list(metadata.query_start_loc_cpu, metadata.query_start_loc)
    write_rows = write_keep = None
    if has_cache:
        slots = metadata.slot_mapping[: starts[-1] if starts else 0].long()
        if bool((slots < 0).any()):  # padding tokens are not written
            write_keep = slots >= 0
            slots = slots[write_keep]
        write_rows = slots + (slots // block_size) * block_size  # block * 2 * bs + offset
    plan = _StepPlan(write_rows, write_keep)
    short_seqs = []
    for s, seq_len in enumerate(seq_lens):
        lo, hi = starts[s], starts[s + 1]
        q_len = hi - lo
        if q_len == 0 or seq_len == 0:
            plan.zero.append((lo, hi))
        elif q_len == seq_len:  # fresh prefill (or a 1-token prompt): its own K/V are the whole context
            plan.fresh.append((lo, hi))
        elif not has_cache:
            raise RuntimeError(
                f"attention without a KV cache needs fresh prefills, but sequence {s} has "
                f"{q_len} new tokens and seq_len {seq_len}"
            )
        elif q_len <= SHORT_QUERY:
            short_seqs.append(s)
        else:  # a chunk after cached context: the last q_len positions of the causal mask
            reads = _reads(metadata.block_tables[s:s + 1], [seq_len], block_size)
            reads.mask = _tail_causal_mask(q_len, seq_len, metadata.block_tables.device)[None, None]
            plan.chunks.append((lo, hi, reads))
    plan.num_tokens = starts[-1] if starts else 0
    if short_seqs:
        plan.short = _short_queries(metadata, short_seqs, seq_lens, starts, block_size)
        plan.short_only = plan.short.q_index is None and plan.short.valid is None and not plan.fresh \
            and not plan.chunks and all(lo == hi for lo, hi in plan.zero) \
            and plan.num_tokens == plan.short.reads.n * plan.short.width
    return plan


def _short_queries(metadata: AttentionMetadata, seqs: list[int], seq_lens: list[int], starts: list[int],
                   block_size: int) -> _ShortQueries:
    """The plan of the short queries of sequences ``seqs`` (see ``_ShortQueries``)."""
    device = metadata.block_tables.device
    q_lens = [starts[s + 1] - starts[s] for s in seqs]
    width = max(q_lens)
    q_rows, key_lens, valid, tokens = [], [], [], []
    for i, (s, q_len) in enumerate(zip(seqs, q_lens)):
        first = seq_lens[s] - q_len  # the position of the sequence's first new token
        for t in range(width):
            u = min(t, q_len - 1)
            q_rows.append(starts[s] + u)
            key_lens.append(first + u + 1)  # a token sees the keys up to its own position
            if t < q_len:
                valid.append(i * width + t)
                tokens.append(starts[s] + t)
    identity = list(range(len(q_rows)))
    reads = _reads(metadata.block_tables[torch.tensor(seqs, device=device)], key_lens, block_size,
                   per_context=width, pad=PAD)
    return _ShortQueries(
        reads, width,
        q_index=None if q_rows == identity else torch.tensor(q_rows, device=device),
        valid=None if valid == identity else torch.tensor(valid, device=device),
        tokens=None if tokens == list(range(len(tokens))) else torch.tensor(tokens, device=device),
    )


def _reads(tables: torch.Tensor, lens: list[int], block_size: int, per_context: int = 1, pad: int = 1) -> _Reads:
    """The cache rows of n contexts (``tables`` (n, max_blocks)) read by ``per_context`` queries each, which
    see the first ``lens`` (n * per_context) keys; padded to the longest, rounded up to a multiple of
    ``pad``. The padding reads row 0; keys past a query's length are masked: mask (n, 1, per_context,
    length), None when every query sees every key."""
    length = -(-max(lens) // pad) * pad
    device = tables.device
    pos = torch.arange(length, device=device)
    context = pos[None, :] < torch.tensor(lens, device=device).view(-1, per_context).amax(1)[:, None]
    k_rows = tables[:, (pos // block_size).clamp(max=tables.shape[1] - 1)].long() * (2 * block_size) \
        + pos % block_size  # (n, length)
    k_rows = torch.where(context, k_rows, 0)
    mask = None
    if any(n != length for n in lens):
        mask = (pos[None, :] < torch.tensor(lens, device=device)[:, None]).view(-1, 1, per_context, length)
    rows = torch.cat([k_rows.flatten(), k_rows.flatten() + block_size])
    return _Reads(rows, tables.shape[0], length, mask)


def _write(flat: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _StepPlan, block_size: int,
           kv_cache: torch.Tensor) -> None:
    """The step's new K/V into their cache rows (V rows are block_size after the K rows)."""
    rows = plan.write_rows
    if plan.write_keep is not None:
        keep = plan.write_keep
        key, value = key[: keep.shape[0]][keep], value[: keep.shape[0]][keep]
    flat.index_copy_(0, rows, as_kv_dtype(key[: rows.shape[0]], kv_cache))
    flat.index_copy_(0, rows + block_size, as_kv_dtype(value[: rows.shape[0]], kv_cache))


def _attend(
    q: torch.Tensor,  # (n, num_heads, q_len, head_dim)
    flat: torch.Tensor,  # the cache as (rows, kvh, d), raw bytes for fp8
    kv_cache: torch.Tensor,
    reads: _Reads,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:  # (n, num_heads, q_len, head_dim)
    """SDPA of n queries over their contexts, read from the cache in one ``index_select``; ``mask`` in place
    of ``reads.mask``."""
    kv = flat.index_select(0, reads.rows)
    if kv.dtype != kv_cache.dtype:  # fp8 bytes
        kv = kv.view(kv_cache.dtype)
    kv = kv.view(2, reads.n, reads.length, *flat.shape[1:]).transpose(2, 3)  # (2, n, kvh, length, d)
    dtype = _attention_dtype(q.dtype, kv.dtype)
    if kv.dtype != dtype:
        kv = kv.to(dtype)
    mask = reads.mask if mask is None else mask
    out = F.scaled_dot_product_attention(q.to(dtype), kv[0], kv[1], attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != kv.shape[2])
    return out.to(q.dtype)


def _attend_short(
    query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    flat: torch.Tensor,
    kv_cache: torch.Tensor,
    short: _ShortQueries,
    scale: float,
) -> torch.Tensor:  # (n * width, num_heads, head_dim): each slot's output (``short.valid`` picks the tokens)
    n, width = short.reads.n, short.width
    q = query[: n * width] if short.q_index is None else query[short.q_index]
    num_heads, head_dim = q.shape[1:]
    # (n, width, h, d) -> (n, h * width, 1, d): sequence-major batch, (head, token) pairs as heads
    q = q.view(n, width, num_heads, head_dim).transpose(1, 2).reshape(n, num_heads * width, 1, head_dim)
    out = _attend(q, flat, kv_cache, short.reads, scale, short.mask(num_heads))
    return out.view(n, num_heads, width, head_dim).transpose(1, 2).reshape(n * width, num_heads, head_dim)


def _sdpa(
    q: torch.Tensor,  # (q_len, num_heads, head_dim)
    k: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    v: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    scale: float,
    causal: bool = False,
) -> torch.Tensor:  # (q_len, num_heads, head_dim)
    dtype = _attention_dtype(q.dtype, k.dtype)
    # With a batch dimension: 3-d inputs miss SDPA's CPU flash kernel (4x slower at 512 tokens).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None].to(dtype), k.transpose(0, 1)[None].to(dtype), v.transpose(0, 1)[None].to(dtype),
        is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).to(q.dtype)


def _attention_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> torch.dtype:
    """What SDPA computes in: bf16 when K/V are bf16 (the CPU fast path's cache), else the query's dtype
    (fp8 K/V widen to it). With a bf16 cache the query is rounded to bf16 too: half the bytes through
    the kernel and no fp32 copy of every context (the output is rounded to bf16 by the o_proj anyway)."""
    return torch.bfloat16 if kv_dtype == torch.bfloat16 else q_dtype


def _tail_causal_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, seq_len) bool: query i sits at position seq_len - q_len + i and sees 0 .. itself."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]

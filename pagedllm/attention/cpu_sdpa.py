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
- for all decodes together, one ``index_select`` of their K and V rows (padded to
  the longest context, the tail masked) and one SDPA call;
- for a chunked or prefix-cached prefill, one ``index_select`` of its context and
  SDPA with the causal mask of its last ``q_len`` positions.

Same interface and numerics contract as the reference (softmax in fp32 inside the
kernel); tests/cpu/test_cpu_attention.py checks it against torch_ref.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, as_kv_dtype, kv_bytes
from pagedllm.attention.torch_ref import _host_list


@dataclass
class _Reads:
    """Cache rows some queries read: ``rows`` (2 * n * length,) = K rows of n contexts of ``length``
    positions each, then their V rows; ``mask`` (n or 1, 1, q, length) bool or None (attend to all)."""

    rows: torch.Tensor
    n: int
    length: int
    mask: torch.Tensor | None


@dataclass
class _StepPlan:
    """What every layer of one step does, worked out once (see the module docstring)."""

    write_rows: torch.Tensor | None  # (tokens written,) K rows of the step's new K/V; None: no cache
    write_keep: torch.Tensor | None  # (num_tokens,) bool when padding tokens (slot -1) are skipped
    fresh: list[tuple[int, int]] = field(default_factory=list)  # (lo, hi) token ranges of fresh prefills
    chunks: list[tuple[int, int, _Reads]] = field(default_factory=list)  # prefills after cached context
    zero: list[tuple[int, int]] = field(default_factory=list)  # sequences' token ranges with nothing to attend
    num_tokens: int = 0  # tokens of the sequences; rows past them are padding (CUDA-graph style), zeroed
    decode_tokens: torch.Tensor | None = None  # (n,) token index of each decode; None: tokens 0..n-1
    decodes: _Reads | None = None
    decode_only: bool = False  # decodes are the step's only tokens, in order: SDPA's output is the output


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
        if plan.decode_only and query.shape[0] == plan.decodes.n:  # no padding rows either
            return _attend(query.unsqueeze(2), flat, kv_cache, plan.decodes, scale).squeeze(2)
        output = torch.empty_like(query)
        for lo, hi in plan.zero:
            output[lo:hi] = 0
        output[plan.num_tokens:] = 0
        if plan.fresh and has_cache and kv_cache.dtype != key.dtype:
            # A fresh prefill attends to its K/V as the cache holds them (rounded to bf16 / fp8), as every
            # later read does: a prompt then gives the same tokens whether its context was computed in this
            # step, in earlier chunks, or found in the prefix cache.
            key, value = key.to(kv_cache.dtype).to(key.dtype), value.to(kv_cache.dtype).to(value.dtype)
        for lo, hi in plan.fresh:
            output[lo:hi] = _sdpa(query[lo:hi], key[lo:hi], value[lo:hi], scale, causal=True)
        for lo, hi, reads in plan.chunks:
            output[lo:hi] = _attend(query[lo:hi].transpose(0, 1)[None], flat, kv_cache, reads, scale)[0] \
                .transpose(0, 1)
        if plan.decodes is not None:
            n = plan.decodes.n
            q = query[:n] if plan.decode_tokens is None else query[plan.decode_tokens]
            out = _attend(q.unsqueeze(2), flat, kv_cache, plan.decodes, scale).squeeze(2)
            if plan.decode_tokens is None:
                output[:n] = out
            else:
                output[plan.decode_tokens] = out
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
    decode_seqs = []
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
        elif q_len == 1:
            decode_seqs.append(s)
        else:  # a chunk after cached context: the last q_len positions of the causal mask
            reads = _reads(metadata.block_tables[s:s + 1], [seq_len], block_size)
            reads.mask = _tail_causal_mask(q_len, seq_len, metadata.block_tables.device)[None, None]
            plan.chunks.append((lo, hi, reads))
    plan.num_tokens = starts[-1] if starts else 0
    if decode_seqs:
        device = metadata.block_tables.device
        tokens = [starts[s] for s in decode_seqs]
        if tokens != list(range(len(tokens))):
            plan.decode_tokens = torch.tensor(tokens, device=device)
        tables = metadata.block_tables[torch.tensor(decode_seqs, device=device)]
        plan.decodes = _reads(tables, [seq_lens[s] for s in decode_seqs], block_size)
        plan.decode_only = plan.decode_tokens is None and not plan.fresh and not plan.chunks \
            and all(lo == hi for lo, hi in plan.zero) and plan.num_tokens == len(tokens)
    return plan


def _reads(tables: torch.Tensor, lens: list[int], block_size: int) -> _Reads:
    """The cache rows of n contexts (``tables`` (n, max_blocks), ``lens`` their lengths), padded to the
    longest; the padding reads row 0 and is masked."""
    length = max(lens)
    device = tables.device
    pos = torch.arange(length, device=device)
    k_rows = tables[:, pos // block_size].long() * (2 * block_size) + pos % block_size  # (n, length)
    mask = None
    if any(n != length for n in lens):
        valid = pos[None, :] < torch.tensor(lens, device=device)[:, None]  # (n, length)
        k_rows = torch.where(valid, k_rows, 0)
        mask = valid[:, None, None, :]
    rows = torch.cat([k_rows.flatten(), k_rows.flatten() + block_size])
    return _Reads(rows, len(lens), length, mask)


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
) -> torch.Tensor:  # (n, num_heads, q_len, head_dim)
    """SDPA of n queries over their contexts, read from the cache in one ``index_select``."""
    kv = flat.index_select(0, reads.rows)
    if kv.dtype != kv_cache.dtype:  # fp8 bytes
        kv = kv.view(kv_cache.dtype)
    kv = kv.view(2, reads.n, reads.length, *flat.shape[1:]).transpose(2, 3)  # (2, n, kvh, length, d)
    if kv.dtype != q.dtype:
        kv = kv.to(q.dtype)
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=reads.mask, scale=scale,
                                          enable_gqa=q.shape[1] != kv.shape[2])


def _sdpa(
    q: torch.Tensor,  # (q_len, num_heads, head_dim)
    k: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    v: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    scale: float,
    causal: bool = False,
) -> torch.Tensor:  # (q_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
        is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def _tail_causal_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, seq_len) bool: query i sits at position seq_len - q_len + i and sees 0 .. itself."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]

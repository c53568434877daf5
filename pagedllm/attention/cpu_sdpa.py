"""The CPU attention backend: torch's fused scaled-dot-product attention over the paged cache.

The reference backend (torch_ref.py) spells attention out as ~10 torch ops per
sequence (two matmuls, mask, softmax, casts, GQA reshapes). On the CPU each op
is a dispatch plus a pass over memory, so this backend hands the same work to
``F.scaled_dot_product_attention`` (one fused, multi-threaded flash kernel on
CPU, GQA included through ``enable_gqa``) and keeps the gathers to a minimum:

- the step's new K/V go into the cache with one ``index_copy_`` each over a flat
  view of the cache (``(num_blocks * 2 * block_size, kvh, d)``);
- a fresh prefill (the whole context is in this step) attends over the step's own
  K/V with ``is_causal``: nothing is read back from the cache;
- decodes are batched: their blocks are gathered once, padded to the longest
  context, and masked with a boolean key mask;
- a chunked or prefix-cached prefill gathers its context and passes the causal
  mask of its last ``q_len`` positions.

Same interface and numerics contract as the reference (softmax in fp32 inside the
kernel); tests/attention/test_cpu_sdpa.py checks it against torch_ref.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, as_kv_dtype, gather_kv, kv_bytes
from pagedllm.attention.torch_ref import _gather_kv, _host_list


class CpuSdpaAttentionBackend(AttentionBackend):
    """Paged attention through ``F.scaled_dot_product_attention`` (the default on CPU)."""

    name = "cpu_sdpa"

    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        seq_lens = _host_list(metadata.seq_lens_cpu, metadata.seq_lens)
        starts = _host_list(metadata.query_start_loc_cpu, metadata.query_start_loc)
        has_cache = kv_cache.numel() > 0
        if has_cache:
            write_kv_flat(key, value, kv_cache, metadata.slot_mapping)
        output = torch.empty_like(query)
        decode_rows = []
        for s, seq_len in enumerate(seq_lens):
            lo, hi = starts[s], starts[s + 1]
            q_len = hi - lo
            if q_len == 0 or seq_len == 0:
                output[lo:hi] = 0
            elif q_len == seq_len:  # fresh prefill (or a 1-token prompt): its own K/V are the whole context
                output[lo:hi] = _sdpa(query[lo:hi], key[lo:hi], value[lo:hi], scale, causal=True)
            elif not has_cache:
                raise RuntimeError(
                    f"attention without a KV cache needs fresh prefills, but sequence {s} has "
                    f"{q_len} new tokens and seq_len {seq_len}"
                )
            elif q_len == 1:
                decode_rows.append(s)
            else:  # a chunk after cached context: the last q_len positions of the causal mask
                k_ctx, v_ctx = _gather_kv(kv_cache, metadata.block_tables[s], seq_len)
                mask = _tail_causal_mask(q_len, seq_len, query.device)
                output[lo:hi] = _sdpa(query[lo:hi], k_ctx, v_ctx, scale, mask=mask)
        if decode_rows:
            _attend_decodes(query, kv_cache, metadata.block_tables, seq_lens, starts, decode_rows, scale, output)
        output[starts[-1]:] = 0  # padding rows (CUDA-graph style batches): defined, never attended
        return output


def write_kv_flat(
    key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    slot_mapping: torch.Tensor,  # (num_tokens,) int64, -1 = skip
) -> None:
    """Scatter new K/V into the cache; slot s of K is row (s // bs) * 2 * bs + s % bs of the flat view."""
    num_blocks, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_bytes(kv_cache).view(num_blocks * 2 * block_size, num_kv_heads, head_dim)
    slots = slot_mapping[: key.shape[0]]
    if bool((slots < 0).any()):  # padding tokens are not written
        keep = slots >= 0
        slots, key, value = slots[keep], key[: keep.shape[0]][keep], value[: keep.shape[0]][keep]
    rows = slots + (slots // block_size) * block_size  # block * 2 * bs + offset
    flat.index_copy_(0, rows, as_kv_dtype(key[: rows.shape[0]], kv_cache))
    flat.index_copy_(0, rows + block_size, as_kv_dtype(value[: rows.shape[0]], kv_cache))


def _sdpa(
    q: torch.Tensor,  # (q_len, num_heads, head_dim)
    k: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    v: torch.Tensor,  # (kv_len, num_kv_heads, head_dim)
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,  # (q_len, kv_len) bool, True = attend
) -> torch.Tensor:  # (q_len, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def _tail_causal_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, seq_len) bool: query i sits at position seq_len - q_len + i and sees 0 .. itself."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]


def _attend_decodes(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    starts: list[int],
    rows: list[int],
    scale: float,
    output: torch.Tensor,
) -> None:
    """All one-token queries in one SDPA call: contexts gathered, padded to the longest, tail masked."""
    device = query.device
    block_size = kv_cache.shape[2]
    max_len = max(seq_lens[s] for s in rows)
    num_blocks = -(-max_len // block_size)
    token_idx = torch.tensor([starts[s] for s in rows], device=device)
    tables = block_tables[torch.tensor(rows, device=device), :num_blocks].long()  # (n, nb)
    blocks = gather_kv(kv_cache, tables)  # (n, nb, 2, block_size, kvh, d)
    n, _, _, _, num_kv_heads, head_dim = blocks.shape
    # (n, kvh, max_len, d): the layout SDPA wants, one copy each for K and V.
    k = blocks[:, :, 0].reshape(n, -1, num_kv_heads, head_dim)[:, :max_len].transpose(1, 2).to(query.dtype)
    v = blocks[:, :, 1].reshape(n, -1, num_kv_heads, head_dim)[:, :max_len].transpose(1, 2).to(query.dtype)
    q = query[token_idx].unsqueeze(2)  # (n, h, 1, d)
    mask = None
    if any(seq_lens[s] != max_len for s in rows):
        lens = torch.tensor([seq_lens[s] for s in rows], device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]  # (n, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != num_kv_heads)  # (n, h, 1, d)
    output[token_idx] = out.squeeze(2)

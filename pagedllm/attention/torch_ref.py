"""The torch reference attention backend: plain PyTorch, any device, any dtype.

It is the correctness reference for the Triton kernels and the backend used on
CPU. It follows the interface in ``backend.py`` literally:

1. scatter the step's new K/V into the paged cache at ``slot_mapping``
   (slot -1 = padding, not written);
2. for each sequence, gather its K/V back from its blocks and attend with
   fp32 scores and softmax, causally: query token i of a chunk of q_len tokens
   sits at position ``seq_len - q_len + i`` and sees positions 0 .. itself.

Decodes (q_len == 1) are batched into one padded matmul so that a step of many
decodes is not a long Python loop; prefill chunks are attended one sequence at
a time (padding a long prefill to the batch would waste quadratic work).

An empty ``kv_cache`` (``numel() == 0``, as during a memory-profiling run
before the cache exists) is accepted when every sequence is a fresh prefill:
attention then runs over the step's own K/V.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, as_kv_dtype, gather_kv, kv_bytes


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention in plain PyTorch (fp32 softmax, GQA, ragged batches)."""

    name = "torch"

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
        output = torch.zeros_like(query)
        if kv_cache.numel() == 0:
            _attend_without_cache(query, key, value, seq_lens, starts, scale, output)
            return output
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)

        decode_rows = [s for s in range(len(seq_lens)) if starts[s + 1] - starts[s] == 1 and seq_lens[s] > 0]
        if decode_rows:
            _attend_decodes(query, kv_cache, metadata.block_tables, seq_lens, starts, decode_rows, scale, output)
        for s in range(len(seq_lens)):
            q_len = starts[s + 1] - starts[s]
            if q_len > 1 and seq_lens[s] > 0:
                block_table = metadata.block_tables[s]
                k_ctx, v_ctx = _gather_kv(kv_cache, block_table, seq_lens[s])
                q = query[starts[s] : starts[s + 1]]
                output[starts[s] : starts[s + 1]] = _causal_attention(q, k_ctx, v_ctx, scale)
        return output


def write_kv_cache(
    key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    slot_mapping: torch.Tensor,  # (num_tokens,) int64, -1 = skip
) -> None:
    """Scatter new K/V into the paged cache; padding tokens (slot -1) are not written."""
    block_size = kv_cache.shape[2]
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_ids, offsets = slots // block_size, slots % block_size
    cache = kv_bytes(kv_cache)
    cache[block_ids, 0, offsets] = as_kv_dtype(key[:num_tokens][valid], kv_cache)
    cache[block_ids, 1, offsets] = as_kv_dtype(value[:num_tokens][valid], kv_cache)


def _host_list(host: list[int] | None, tensor: torch.Tensor) -> list[int]:
    return list(host) if host is not None else tensor.tolist()


def _gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence, each (seq_len, num_kv_heads, head_dim), read back from its blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = gather_kv(kv_cache, block_table[:num_blocks].long())  # (nb, 2, block_size, kvh, d)
    k = blocks[:, 0].flatten(0, 1)[:seq_len]
    v = blocks[:, 1].flatten(0, 1)[:seq_len]
    return k, v


def _causal_attention(
    q: torch.Tensor,  # (q_len, num_heads, head_dim)
    k: torch.Tensor,  # (seq_len, num_kv_heads, head_dim)
    v: torch.Tensor,  # (seq_len, num_kv_heads, head_dim)
    scale: float,
) -> torch.Tensor:  # (q_len, num_heads, head_dim)
    """Dense attention of the last q_len positions of a sequence over all its seq_len positions."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    # GQA: query head h reads KV head h // group (HF's repeat_kv), so group the query heads per KV head.
    qg = q.float().view(q_len, num_kv_heads, num_heads // num_kv_heads, head_dim).permute(1, 2, 0, 3)
    scores = torch.matmul(qg, k.float().permute(1, 2, 0).unsqueeze(1)) * scale  # (kvh, g, q_len, seq_len)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().transpose(0, 1).unsqueeze(1))  # (kvh, g, q_len, d)
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)


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
    """All one-token queries at once: pad their contexts to the longest and mask the tail."""
    device = query.device
    block_size = kv_cache.shape[2]
    max_len = max(seq_lens[s] for s in rows)
    num_blocks = -(-max_len // block_size)
    lens = torch.tensor([seq_lens[s] for s in rows], device=device)
    token_idx = torch.tensor([starts[s] for s in rows], device=device)
    tables = block_tables[torch.tensor(rows, device=device), :num_blocks].long()  # (n, nb)
    blocks = gather_kv(kv_cache, tables)  # (n, nb, 2, block_size, kvh, d)
    n, _, _, _, num_kv_heads, head_dim = blocks.shape
    k = blocks[:, :, 0].reshape(n, -1, num_kv_heads, head_dim)[:, :max_len].float()  # (n, max_len, kvh, d)
    v = blocks[:, :, 1].reshape(n, -1, num_kv_heads, head_dim)[:, :max_len].float()
    q = query[token_idx].float().view(n, num_kv_heads, -1, head_dim)  # (n, kvh, g, d)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scale  # (n, kvh, g, max_len)
    beyond = torch.arange(max_len, device=device)[None, :] >= lens[:, None]  # (n, max_len)
    scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.transpose(1, 2))  # (n, kvh, g, d)
    output[token_idx] = out.reshape(n, -1, head_dim).to(output.dtype)


def _attend_without_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: list[int],
    starts: list[int],
    scale: float,
    output: torch.Tensor,
) -> None:
    """Profiling path (no cache yet): every sequence must be a fresh prefill of its whole context."""
    for s, seq_len in enumerate(seq_lens):
        lo, hi = starts[s], starts[s + 1]
        if hi - lo != seq_len:
            raise RuntimeError(
                f"attention without a KV cache needs fresh prefills, but sequence {s} has "
                f"{hi - lo} new tokens and seq_len {seq_len}"
            )
        if seq_len > 0:
            output[lo:hi] = _causal_attention(query[lo:hi], key[lo:hi], value[lo:hi], scale)

"""The torch reference backend against dense causal attention computed from whole sequences."""

import random

import pytest
import torch

from pagedllm.attention.backend import AttentionMetadata, get_backend
from pagedllm.attention.torch_ref import TorchAttentionBackend

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 16


def dense_reference(q, k, v, scale):
    """q (q_len, H, D) at the last q_len positions of k/v (seq_len, KVH, D); plain softmax attention."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(q_len):
            visible = seq_len - q_len + i + 1
            w = torch.softmax((kh[:visible] @ q[i, h].double()) * scale, dim=0)
            out[i, h] = w @ vh[:visible]
    return out


def build_batch(specs, block_size, num_blocks, dtype=torch.float32, num_padding=0, seed=0):
    """specs: (context_len, q_len) per sequence. Context K/V are pre-written into shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    free = list(range(1, num_blocks))
    random.Random(seed).shuffle(free)
    cache = torch.zeros(num_blocks, 2, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    queries, keys, values, slots, tables, full = [], [], [], [], [], []
    for ctx, q_len in specs:
        seq_len = ctx + q_len
        k = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        for p in range(ctx):  # the context is already in the cache
            cache[table[p // block_size], 0, p % block_size] = k[p]
            cache[table[p // block_size], 1, p % block_size] = v[p]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, seq_len)]
        queries.append(q)
        keys.append(k[ctx:])
        values.append(v[ctx:])
        tables.append(table)
        full.append((q, k, v))
    max_blocks = max(len(t) for t in tables)
    seq_lens = [c + n for c, n in specs]
    starts = [0]
    for _, n in specs:
        starts.append(starts[-1] + n)
    pad = torch.zeros(num_padding, NUM_HEADS, HEAD_DIM, dtype=dtype)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * num_padding),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(n for _, n in specs), max_seq_len=max(seq_lens), num_actual_tokens=starts[-1],
        seq_lens_cpu=seq_lens, query_start_loc_cpu=starts,
    )
    query = torch.cat(queries + [pad])
    key = torch.cat(keys + [pad[:, :NUM_KV_HEADS]])
    value = torch.cat(values + [pad[:, :NUM_KV_HEADS]])
    return query, key, value, cache, md, full


MIXED = [(0, 7), (5, 3), (9, 1), (0, 1), (13, 1), (15, 1), (4, 12), (31, 1)]


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_matches_dense_attention(block_size):
    scale = HEAD_DIM**-0.5
    query, key, value, cache, md, full = build_batch(MIXED, block_size, num_blocks=64, num_padding=3)
    before = cache.clone()
    out = TorchAttentionBackend().forward(query, key, value, cache, md, scale)
    assert out.shape == query.shape
    for s, (q, k, v) in enumerate(full):
        lo, hi = md.query_start_loc_cpu[s], md.query_start_loc_cpu[s + 1]
        torch.testing.assert_close(out[lo:hi].double(), dense_reference(q, k, v, scale), atol=1e-5, rtol=1e-5)
    # New K/V landed exactly at their slots; padding (slot -1) wrote nothing.
    expected = before.clone()
    slots = md.slot_mapping[: md.num_actual_tokens]
    expected[slots // block_size, 0, slots % block_size] = key[: md.num_actual_tokens]
    expected[slots // block_size, 1, slots % block_size] = value[: md.num_actual_tokens]
    assert torch.equal(cache, expected)


def test_without_host_lists_and_with_seq_len_zero_rows():
    """Metadata without *_cpu lists reads the tensors; a padded row (seq_len 0, q_len 0) is harmless."""
    scale = 0.3
    query, key, value, cache, md, full = build_batch([(3, 2), (6, 1)], 8, num_blocks=16)
    ref = TorchAttentionBackend().forward(query, key, value, cache.clone(), md, scale)
    md.seq_lens = torch.cat([md.seq_lens, torch.zeros(1, dtype=torch.int32)])
    md.query_start_loc = torch.cat([md.query_start_loc, md.query_start_loc[-1:]])
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1])])
    md.seq_lens_cpu = md.query_start_loc_cpu = None
    out = TorchAttentionBackend().forward(query, key, value, cache, md, scale)
    torch.testing.assert_close(out, ref)


def test_bfloat16_inputs_close_to_fp32_reference():
    scale = HEAD_DIM**-0.5
    query, key, value, cache, md, full = build_batch(MIXED, 16, num_blocks=64, dtype=torch.bfloat16)
    out = TorchAttentionBackend().forward(query, key, value, cache, md, scale)
    assert out.dtype == torch.bfloat16
    for s, (q, k, v) in enumerate(full):
        lo, hi = md.query_start_loc_cpu[s], md.query_start_loc_cpu[s + 1]
        torch.testing.assert_close(out[lo:hi].double(), dense_reference(q, k, v, scale), atol=2e-2, rtol=2e-2)


def test_empty_cache_runs_fresh_prefills_and_rejects_context():
    scale = HEAD_DIM**-0.5
    query, key, value, _, md, full = build_batch([(0, 5), (0, 9)], 4, num_blocks=16)
    out = TorchAttentionBackend().forward(query, key, value, torch.empty(0), md, scale)
    for s, (q, k, v) in enumerate(full):
        lo, hi = md.query_start_loc_cpu[s], md.query_start_loc_cpu[s + 1]
        torch.testing.assert_close(out[lo:hi].double(), dense_reference(q, k, v, scale), atol=1e-5, rtol=1e-5)
    query, key, value, _, md, _ = build_batch([(3, 2)], 4, num_blocks=16)
    with pytest.raises(RuntimeError, match="fresh prefills"):
        TorchAttentionBackend().forward(query, key, value, torch.empty(0), md, scale)


def test_registered_as_torch():
    assert isinstance(get_backend("torch"), TorchAttentionBackend)


def test_registry_is_lazy_and_takes_factories():
    from pagedllm.attention import backend

    assert {"torch", "triton"} <= set(backend.available_backends())
    backend.register_backend("probe", TorchAttentionBackend)
    try:
        assert isinstance(get_backend("probe"), TorchAttentionBackend)
    finally:
        del backend._BACKENDS["probe"]
    with pytest.raises(ValueError, match="attention_backend: unknown backend 'nope'"):
        get_backend("nope")

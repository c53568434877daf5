"""Triton paged-attention backend against a dense PyTorch reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set before the kernels are defined) on small fp32/fp16 shapes; the
``gpu``-marked tests run compiled kernels on bigger bf16 shapes and check that
the decode path survives CUDA-graph capture. The reference is independent of
the kernels: it attends over each sequence's K/V as generated (dense, causal,
float64), so it checks the cache write and the block-table reads as well.
"""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch  # does not import triton

if not torch.cuda.is_available():
    # Must precede the first @triton.jit decoration (the kernels' import); on a GPU the
    # kernels compile and the interpreter tests below are skipped.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from pagedllm.attention.backend import AttentionMetadata  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend, choose_num_splits  # noqa: E402
from pagedllm.attention.triton_paged_attention import reshape_and_cache  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_ONLY = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (TRITON_INTERPRET=1 was not set first)")


@dataclass
class Case:
    """One attention step: inputs, the cache holding the earlier context, and the expected result."""

    query: torch.Tensor  # (num_tokens, num_heads, head_dim)
    key: torch.Tensor  # (num_tokens, num_kv_heads, head_dim)
    value: torch.Tensor
    kv_cache: torch.Tensor  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    metadata: AttentionMetadata
    expected_out: torch.Tensor  # (num_tokens, num_heads, head_dim) float64
    expected_cache: torch.Tensor  # kv_cache after the step's writes


def make_case(specs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: str = "cpu", num_pad_seqs: int = 0, seed: int = 0) -> Case:
    """specs: (context_len, q_len) per sequence. Padding sequences (seq_len 0, one token, slot -1)
    are appended the way a CUDA-graph runner pads a decode batch; their expected output is 0."""
    gen = torch.Generator().manual_seed(seed)
    seq_blocks = [triton_cdiv(c + q, block_size) for c, q in specs]
    num_blocks = sum(seq_blocks) + 3  # block 0 stays unused, as a null block would
    # Unused and not-yet-written cache entries are NaN: reading one would poison the output.
    cache = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=torch.float64)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(seq_blocks + [1])
    block_tables = torch.zeros(len(specs) + num_pad_seqs, max_blocks, dtype=torch.int32)
    qs, ks, vs, slots, outs = [], [], [], [], []
    for s, (context_len, q_len) in enumerate(specs):
        seq_len = context_len + q_len
        table = [perm.pop() for _ in range(seq_blocks[s])]
        block_tables[s, : len(table)] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
        q = torch.randn(q_len, num_heads, head_dim, generator=gen, dtype=torch.float64)
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        for p in range(context_len):  # the earlier steps' K/V is already cached
            cache[seq_slots[p] // block_size, 0, seq_slots[p] % block_size] = k[p]
            cache[seq_slots[p] // block_size, 1, seq_slots[p] % block_size] = v[p]
        qs.append(q), ks.append(k[context_len:]), vs.append(v[context_len:])
        slots += seq_slots[context_len:]
        outs.append(dense_causal_attention(q, k, v, head_dim**-0.5))
    for _ in range(num_pad_seqs):
        qs.append(torch.randn(1, num_heads, head_dim, generator=gen, dtype=torch.float64))
        ks.append(torch.randn(1, num_kv_heads, head_dim, generator=gen, dtype=torch.float64))
        vs.append(torch.randn(1, num_kv_heads, head_dim, generator=gen, dtype=torch.float64))
        slots.append(-1)
        outs.append(torch.zeros(1, num_heads, head_dim, dtype=torch.float64))
    q_lens = [q for _, q in specs] + [1] * num_pad_seqs
    seq_lens = [c + q for c, q in specs] + [0] * num_pad_seqs
    query_start_loc = [0]
    for q_len in q_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    key, value = torch.cat(ks).to(dtype), torch.cat(vs).to(dtype)
    expected_cache = cache.to(dtype).clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            expected_cache[slot // block_size, 0, slot % block_size] = key[t]
            expected_cache[slot // block_size, 1, slot % block_size] = value[t]
    # q, k and v as strided views of one fused projection output, as a model hands them over.
    query = torch.cat(qs).to(dtype)
    num_tokens = query.shape[0]
    qkv = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], dim=1).to(device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), num_actual_tokens=num_tokens,
        seq_lens_cpu=seq_lens, query_start_loc_cpu=query_start_loc,
    )
    return Case(
        query=qkv[:, :q_size].view(num_tokens, num_heads, head_dim),
        key=qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim),
        value=qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim),
        kv_cache=cache.to(dtype).to(device), metadata=metadata,
        expected_out=torch.cat(outs), expected_cache=expected_cache,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (q_len, H, D) are the last q_len positions of k/v (seq_len, KVH, D); float64 reference."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def run_case(case: Case, backend: TritonAttentionBackend, atol: float, rtol: float = 0.0) -> None:
    out = backend.forward(case.query, case.key, case.value, case.kv_cache, case.metadata,
                          scale=case.query.shape[-1] ** -0.5)
    torch.testing.assert_close(case.kv_cache.cpu(), case.expected_cache, equal_nan=True, atol=0, rtol=0)
    assert out.shape == case.query.shape and out.dtype == case.query.dtype
    torch.testing.assert_close(out.cpu().double(), case.expected_out, atol=atol, rtol=rtol)


# A mixed step: fresh prefill, decodes, a chunk after cached context, a block-boundary decode,
# a chunk starting exactly at a block boundary; lengths mostly not multiples of the block size.
MIXED = [(0, 21), (40, 1), (27, 13), (31, 1), (32, 6), (0, 1)]


@CPU_ONLY
@pytest.mark.parametrize("queries_per_kv", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_prefill_decode_fp32(queries_per_kv: int, block_size: int) -> None:
    case = make_case(MIXED, num_heads=2 * queries_per_kv, num_kv_heads=2, head_dim=32,
                     block_size=block_size, dtype=torch.float32, seed=queries_per_kv * block_size)
    run_case(case, TritonAttentionBackend(), atol=2e-5)


@CPU_ONLY
def test_mixed_fp16_head_dim_64_odd_group() -> None:
    # 3 query heads per KV head (SmolLM2-135M's 9/3) leaves rows of each program unused.
    case = make_case([(5, 18), (50, 1), (0, 3)], num_heads=6, num_kv_heads=2, head_dim=64, block_size=16,
                     dtype=torch.float16, seed=1)
    run_case(case, TritonAttentionBackend(), atol=2e-3, rtol=1e-2)


@CPU_ONLY
def test_head_dim_128_with_padding_rows() -> None:
    case = make_case([(17, 1), (70, 1)], num_heads=8, num_kv_heads=1, head_dim=128, block_size=16,
                     dtype=torch.float32, num_pad_seqs=2, seed=2)
    run_case(case, TritonAttentionBackend(), atol=2e-5)


@CPU_ONLY
@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_split_decode(num_splits: int) -> None:
    # Contexts shorter than, equal to and longer than a split's share; one padded row.
    specs = [(0, 1), (16, 1), (99, 1), (300, 1)]
    case = make_case(specs, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32,
                     num_pad_seqs=1, seed=3 + num_splits)
    run_case(case, TritonAttentionBackend(decode_num_splits=num_splits), atol=2e-5)


@CPU_ONLY
def test_split_decode_fp16_block_32() -> None:
    case = make_case([(150, 1), (33, 1)], num_heads=4, num_kv_heads=1, head_dim=64, block_size=32,
                     dtype=torch.float16, seed=9)
    run_case(case, TritonAttentionBackend(decode_num_splits=4), atol=2e-3, rtol=1e-2)


@CPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_skips_padding_slots(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 3, 32
    cache = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([5, -1, 17, 95, -1, 40], dtype=torch.int64)
    # Non-contiguous key/value: every other row of a larger tensor.
    key = torch.randn(12, num_kv_heads, head_dim, generator=gen).to(dtype)[::2]
    value = torch.randn(12, num_kv_heads, head_dim, generator=gen).to(dtype)[::2]
    expected = cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 0, slot % block_size] = key[t]
            expected[slot // block_size, 1, slot % block_size] = value[t]
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


def test_choose_num_splits() -> None:
    # Enough (sequence, KV head) programs already: no split.
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 1
    # One long sequence: split, capped, a power of two.
    splits = choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, num_sms=132)
    assert splits == 32
    assert choose_num_splits(num_seqs=8, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 4
    assert choose_num_splits(num_seqs=64, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    # Short contexts are not worth splitting.
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=300, num_sms=132) == 1


@CPU_ONLY
def test_rejects_unsupported_inputs() -> None:
    backend = TritonAttentionBackend()
    case = make_case([(3, 2)], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
    args = (case.key, case.value, case.kv_cache, case.metadata, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        bad = make_case([(3, 2)], num_heads=4, num_kv_heads=2, head_dim=48, block_size=16, dtype=torch.float32)
        backend.forward(bad.query, bad.key, bad.value, bad.kv_cache, bad.metadata, 1.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        backend.forward(case.query[:, :3], *args)
    with pytest.raises(ValueError, match="dtype"):
        backend.forward(case.query.half(), *args)
    with pytest.raises(ValueError, match="decode_num_splits"):
        TritonAttentionBackend(decode_num_splits=3)


def test_package_does_not_import_triton() -> None:
    code = ("import sys, pagedllm, pagedllm.config, pagedllm.attention.backend; "
            "sys.exit(1 if 'triton' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---- GPU: compiled kernels, bf16, CUDA graphs ---------------------------------------------------

def _bf16_tolerance(case: Case, out: torch.Tensor) -> None:
    err = (out.double().cpu() - case.expected_out).norm() / case.expected_out.norm()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("queries_per_kv,head_dim", [(1, 64), (4, 128), (8, 128), (3, 64)])
def test_gpu_mixed_bf16(queries_per_kv: int, head_dim: int) -> None:
    specs = [(0, 300), (1000, 1), (517, 77), (16, 1), (2047, 1), (64, 129), (0, 1)]
    case = make_case(specs, num_heads=4 * queries_per_kv, num_kv_heads=4, head_dim=head_dim, block_size=16,
                     dtype=torch.bfloat16, device="cuda", seed=queries_per_kv)
    out = TritonAttentionBackend().forward(case.query, case.key, case.value, case.kv_cache, case.metadata,
                                           scale=head_dim**-0.5)
    torch.testing.assert_close(case.kv_cache.cpu(), case.expected_cache, equal_nan=True, atol=0, rtol=0)
    _bf16_tolerance(case, out)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_decode_cuda_graph(block_size: int) -> None:
    """Capture one decode step, then replay it over other contexts copied into the same buffers.

    The capture sees max_seq_len 900 (so its split count); the replays reach 4000, which must
    still be right because the kernels read the lengths from seq_lens, not from the capture."""
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=block_size, dtype=torch.bfloat16,
                 device="cuda")
    cases = [make_case([(899, 1), (300, 1), (5, 1)], num_pad_seqs=1, seed=0, **shape),
             make_case([(3999, 1), (17, 1), (1200, 1)], num_pad_seqs=1, seed=1, **shape),
             make_case([(0, 1), (2500, 1), (64, 1)], num_pad_seqs=1, seed=2, **shape)]
    num_blocks = max(c.kv_cache.shape[0] for c in cases)
    width = max(c.metadata.block_tables.shape[1] for c in cases)
    static = cases[0]
    kv_cache = torch.empty((num_blocks, *static.kv_cache.shape[1:]), dtype=torch.bfloat16, device="cuda")
    block_tables = torch.zeros(static.metadata.num_seqs, width, dtype=torch.int32, device="cuda")
    metadata = AttentionMetadata(static.metadata.slot_mapping, block_tables, static.metadata.seq_lens,
                                 static.metadata.query_start_loc, max_query_len=1, max_seq_len=900,
                                 num_actual_tokens=static.metadata.num_actual_tokens)
    args = (static.query, static.key, static.value, kv_cache, metadata)
    backend = TritonAttentionBackend()
    backend.forward(*args, scale=128**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*args, scale=128**-0.5)
    for case in cases:
        for name in ("query", "key", "value"):
            getattr(static, name).copy_(getattr(case, name))
        kv_cache.fill_(float("nan"))
        kv_cache[: case.kv_cache.shape[0]].copy_(case.kv_cache)
        for name in ("slot_mapping", "seq_lens", "query_start_loc"):
            getattr(metadata, name).copy_(getattr(case.metadata, name))
        block_tables.zero_()
        block_tables[:, : case.metadata.block_tables.shape[1]].copy_(case.metadata.block_tables)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _bf16_tolerance(case, out)
        torch.testing.assert_close(kv_cache[: case.kv_cache.shape[0]].cpu(), case.expected_cache,
                                   equal_nan=True, atol=0, rtol=0)

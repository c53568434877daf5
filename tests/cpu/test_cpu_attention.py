"""The CPU SDPA backend against dense attention and the torch reference, on the reference tests' batches."""

import pytest
import torch

from pagedllm.attention.backend import get_backend
from pagedllm.attention.cpu_sdpa import CpuSdpaAttentionBackend
from pagedllm.attention.torch_ref import TorchAttentionBackend
from tests.attention.test_torch_ref import HEAD_DIM, MIXED, build_batch, dense_reference

SCALE = HEAD_DIM**-0.5
# MIXED plus a chunk of more than cpu_sdpa.SHORT_QUERY tokens after cached context (the one-block chunk path;
# shorter chunks and decodes take the token-by-token path).
CPU_MIXED = [*MIXED, (20, 17)]


def _check_against_dense(out, md, full, atol):
    for s, (q, k, v) in enumerate(full):
        lo, hi = md.query_start_loc_cpu[s], md.query_start_loc_cpu[s + 1]
        torch.testing.assert_close(out[lo:hi].double(), dense_reference(q, k, v, SCALE), atol=atol, rtol=atol)


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_matches_dense_and_writes_the_same_cache(block_size):
    """Fresh prefills, chunks after context, decodes of different lengths and 3 padding tokens in one step."""
    query, key, value, cache, md, full = build_batch(CPU_MIXED, block_size, num_blocks=64, num_padding=3)
    ref_cache = cache.clone()
    out = CpuSdpaAttentionBackend().forward(query, key, value, cache, md, SCALE)
    ref = TorchAttentionBackend().forward(query, key, value, ref_cache, md, SCALE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.shape == query.shape
    _check_against_dense(out, md, full, atol=1e-5)
    assert torch.equal(cache, ref_cache)  # same slots written, padding (slot -1) skipped
    assert torch.equal(out[md.num_actual_tokens:], torch.zeros_like(out[md.num_actual_tokens:]))


def test_decodes_of_equal_length_need_no_mask():
    query, key, value, cache, md, full = build_batch([(9, 1), (9, 1), (9, 1)], 4, num_blocks=32)
    out = CpuSdpaAttentionBackend().forward(query, key, value, cache, md, SCALE)
    _check_against_dense(out, md, full, atol=1e-5)


def test_bfloat16_close_to_dense():
    query, key, value, cache, md, full = build_batch(CPU_MIXED, 16, num_blocks=64, dtype=torch.bfloat16)
    out = CpuSdpaAttentionBackend().forward(query, key, value, cache, md, SCALE)
    assert out.dtype == torch.bfloat16
    _check_against_dense(out, md, full, atol=2e-2)


def test_fp32_queries_over_a_bf16_cache_attend_in_bf16():
    """The fast path's mix (fp32 activations, bf16 cache): every kind of sequence attends in bf16, i.e. the
    query is rounded to bf16 (the same output as a query rounded beforehand); an fp32 cache does not round."""
    query, key, value, cache, md, full = build_batch(CPU_MIXED, 16, num_blocks=64)
    half = cache.to(torch.bfloat16)
    out = CpuSdpaAttentionBackend().forward(query, key, value, half.clone(), md, SCALE)
    rounded = query.to(torch.bfloat16).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, CpuSdpaAttentionBackend().forward(rounded, key, value, half.clone(), md, SCALE))
    _check_against_dense(out, md, full, atol=2e-2)
    exact = CpuSdpaAttentionBackend().forward(query, key, value, cache.clone(), md, SCALE)
    assert not torch.equal(exact, CpuSdpaAttentionBackend().forward(rounded, key, value, cache.clone(), md, SCALE))


def _metadata(tables, seq_lens, q_lens, block_size):
    """Metadata of sequences with ``q_lens`` new tokens each, at the end of contexts of ``seq_lens``."""
    from pagedllm.attention.backend import AttentionMetadata

    slots, starts = [], [0]
    for table, seq_len, q_len in zip(tables, seq_lens, q_lens, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                    dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), num_actual_tokens=starts[-1],
        seq_lens_cpu=list(seq_lens), query_start_loc_cpu=starts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_decode_does_not_depend_on_its_batch_and_a_verification_equals_decodes(dtype):
    """The guarantees cpu_sdpa's padding and one-token queries exist for, bit for bit: a decode alone and
    beside others of other lengths (past SDPA's 512-key split); a 4-token verification and the 4 decodes at
    its positions."""
    gen = torch.Generator().manual_seed(0)
    block_size, lens = 16, [37, 700, 1100]
    cache = torch.randn(200, 2, block_size, 2, HEAD_DIM, generator=gen).to(dtype)  # every slot holds a value
    tables, first = [], 1
    for n in lens:
        tables.append(list(range(first, first + -(-n // block_size))))
        first += len(tables[-1])
    q = torch.randn(len(lens), 4, HEAD_DIM, generator=gen)
    k, v = (torch.randn(len(lens), 2, HEAD_DIM, generator=gen) for _ in range(2))
    backend = CpuSdpaAttentionBackend()
    batch = backend.forward(q, k, v, cache.clone(), _metadata(tables, lens, [1, 1, 1], block_size), SCALE)
    for i in range(len(lens)):
        alone = backend.forward(q[i:i + 1], k[i:i + 1], v[i:i + 1], cache.clone(),
                                _metadata(tables[i:i + 1], lens[i:i + 1], [1], block_size), SCALE)
        assert torch.equal(alone[0], batch[i])
    table, n = [tables[1]], lens[1]
    q4, k4, v4 = (torch.randn(4, h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
    verified_cache = cache.clone()
    verified = backend.forward(q4, k4, v4, verified_cache, _metadata(table, [n], [4], block_size), SCALE)
    for j in range(4):
        decoded = backend.forward(q4[j:j + 1], k4[j:j + 1], v4[j:j + 1], verified_cache.clone(),
                                  _metadata(table, [n - 3 + j], [1], block_size), SCALE)
        assert torch.equal(decoded[0], verified[j])


def test_empty_cache_runs_fresh_prefills_and_rejects_context():
    query, key, value, _, md, full = build_batch([(0, 5), (0, 9)], 4, num_blocks=16)
    out = CpuSdpaAttentionBackend().forward(query, key, value, torch.empty(0), md, SCALE)
    _check_against_dense(out, md, full, atol=1e-5)
    query, key, value, _, md, _ = build_batch([(3, 2)], 4, num_blocks=16)
    with pytest.raises(RuntimeError, match="fresh prefills"):
        CpuSdpaAttentionBackend().forward(query, key, value, torch.empty(0), md, SCALE)


def test_host_lists_optional_and_empty_rows_are_zero():
    query, key, value, cache, md, _ = build_batch([(3, 2), (6, 1)], 8, num_blocks=16)
    ref = CpuSdpaAttentionBackend().forward(query, key, value, cache.clone(), md, SCALE)
    md.seq_lens = torch.cat([md.seq_lens, torch.zeros(1, dtype=torch.int32)])
    md.query_start_loc = torch.cat([md.query_start_loc, md.query_start_loc[-1:]])
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1])])
    md.seq_lens_cpu = md.query_start_loc_cpu = None
    torch.testing.assert_close(CpuSdpaAttentionBackend().forward(query, key, value, cache, md, SCALE), ref)


def test_auto_picks_it_on_cpu_and_torch_stays_selectable():
    if not torch.cuda.is_available():
        assert isinstance(get_backend("auto"), CpuSdpaAttentionBackend)
    assert isinstance(get_backend("cpu_sdpa"), CpuSdpaAttentionBackend)
    assert isinstance(get_backend("torch"), TorchAttentionBackend)

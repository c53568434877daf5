"""Correctness and speed of the Triton paged-attention backend on one GPU.

    PYTHONPATH=. python3 benchmarks/bench_attention.py            # on a CUDA GPU
    PYTHONPATH=. python3 benchmarks/bench_attention.py --smoke    # tiny shapes, CPU interpreter

1. Checks the backend on random inputs (many shapes, bf16 and fp16) against a
   dense fp32 reference that gathers each sequence's K/V through its block
   table, and against the "torch" reference backend where it is installed.
2. Measures the device-to-device copy bandwidth (bytes read + written).
3. Times decode (Llama-3-8B heads: 32 q, 8 kv, head_dim 128; block 16) for
   batch 1/8/64/256 x context 512..8192, each as a CUDA graph over several
   input sets, against scaled_dot_product_attention on the equivalent dense
   tensors; then sweeps decode split counts and tile shapes.
4. Times a causal prefill and a mixed prefill+decode batch the same way.
Full results go to $OUT/bench_attention.json when OUT is set.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import triton  # noqa: E402

from pagedllm.attention.backend import AttentionMetadata  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend, choose_num_splits  # noqa: E402
from pagedllm.attention.triton_paged_attention import paged_attention  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
HEADS = dict(num_heads=8, num_kv_heads=2, head_dim=64) if SMOKE else dict(num_heads=32, num_kv_heads=8, head_dim=128)
RESULTS: dict = {"correctness": [], "decode": [], "splits": [], "tiles": [], "prefill": []}


@dataclass
class Batch:
    query: torch.Tensor  # (num_tokens, num_heads, head_dim)
    key: torch.Tensor  # (num_tokens, num_kv_heads, head_dim)
    value: torch.Tensor
    kv_cache: torch.Tensor  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
    metadata: AttentionMetadata
    specs: list[tuple[int, int]]  # (context_len, q_len) per sequence

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V that attention must read (each cached token once)."""
        tokens = sum(c + q for c, q in self.specs)
        return tokens * 2 * self.kv_cache.shape[3] * self.kv_cache.shape[4] * self.kv_cache.element_size()


def random_batch(specs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, block_offset: int = 0,
                 kv_cache: torch.Tensor | None = None) -> Batch:
    """A step whose earlier context is already in a random cache; blocks in random order.
    ``kv_cache``/``block_offset`` let several batches share one cache in disjoint blocks."""
    seq_blocks = [triton.cdiv(c + q, block_size) for c, q in specs]
    needed = sum(seq_blocks)
    dtype = torch.float32 if SMOKE and dtype == torch.bfloat16 else dtype  # the interpreter's bf16 is wrong
    if kv_cache is None:
        kv_cache = torch.randn(needed + 1, 2, block_size, num_kv_heads, head_dim,
                               dtype=dtype, device=DEVICE)
    dtype = kv_cache.dtype
    perm = torch.randperm(needed, device=DEVICE).to(torch.int32) + block_offset
    width = max(seq_blocks)
    block_tables = torch.zeros(len(specs), width, dtype=torch.int32, device=DEVICE)
    q_lens = torch.tensor([q for _, q in specs], device=DEVICE)
    seq_lens = torch.tensor([c + q for c, q in specs], dtype=torch.int32, device=DEVICE)
    start, slots = 0, []
    for s, (context_len, q_len) in enumerate(specs):
        table = perm[start : start + seq_blocks[s]]
        start += seq_blocks[s]
        block_tables[s, : seq_blocks[s]] = table
        pos = torch.arange(context_len, context_len + q_len, device=DEVICE)
        slots.append(table[pos // block_size].long() * block_size + pos % block_size)
    num_tokens = int(q_lens.sum())
    query_start_loc = torch.zeros(len(specs) + 1, dtype=torch.int32, device=DEVICE)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    metadata = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=block_tables, seq_lens=seq_lens,
        query_start_loc=query_start_loc, max_query_len=max(q for _, q in specs),
        max_seq_len=max(c + q for c, q in specs), num_actual_tokens=num_tokens,
        seq_lens_cpu=[c + q for c, q in specs], query_start_loc_cpu=query_start_loc.tolist(),
    )
    new = lambda h: torch.randn(num_tokens, h, head_dim, dtype=dtype, device=DEVICE)  # noqa: E731
    return Batch(new(num_heads), new(num_kv_heads), new(num_kv_heads), kv_cache, metadata, specs)


def dense_reference(batch: Batch, scale: float) -> torch.Tensor:
    """fp32 causal attention per sequence: K/V gathered from the cache (context) and the new K/V."""
    md, cache = batch.metadata, batch.kv_cache
    block_size, num_heads = cache.shape[2], batch.query.shape[1]
    flat = cache.transpose(0, 1).reshape(2, -1, *cache.shape[3:])  # (2, num_slots, kvh, hd)
    outs = []
    for s, (context_len, q_len) in enumerate(batch.specs):
        q0 = md.query_start_loc_cpu[s]
        pos = torch.arange(context_len, device=DEVICE)
        slots = md.block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = torch.cat([flat[0, slots], batch.key[q0 : q0 + q_len]]).float()
        v = torch.cat([flat[1, slots], batch.value[q0 : q0 + q_len]]).float()
        rep = num_heads // k.shape[1]
        k, v = k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1)
        q = batch.query[q0 : q0 + q_len].float().transpose(0, 1)  # (H, q_len, D)
        scores = q @ k.transpose(1, 2) * scale  # (H, q_len, seq_len)
        keys = torch.arange(context_len + q_len, device=DEVICE)
        scores.masked_fill_(keys[None, :] > (context_len + torch.arange(q_len, device=DEVICE))[:, None], -torch.inf)
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def torch_reference_backend():
    try:
        from pagedllm.attention.backend import get_backend

        return get_backend("torch")
    except Exception as exc:  # written in parallel by another engineer; absent or broken is not fatal here
        print(f"[correctness] torch reference backend unavailable ({exc}); dense reference only")
        return None


def check_correctness() -> None:
    """Random shapes through the backend; fail loudly on any error above bf16 tolerance."""
    torch_ref = torch_reference_backend()
    scale_of = lambda b: b.query.shape[-1] ** -0.5  # noqa: E731
    cases = [  # (queries_per_kv, head_dim, block_size, dtype, mode)
        (4, 128, 16, torch.bfloat16, "mixed"), (4, 128, 16, torch.bfloat16, "decode"),
        (4, 128, 16, torch.bfloat16, "split8"), (8, 128, 32, torch.bfloat16, "mixed"),
        (1, 64, 16, torch.bfloat16, "mixed"), (1, 64, 64, torch.bfloat16, "split8"),
        (3, 64, 16, torch.bfloat16, "mixed"), (3, 64, 16, torch.float16, "decode"),
        (8, 128, 32, torch.float16, "mixed"), (4, 128, 16, torch.float16, "split8"),
        (2, 256, 16, torch.bfloat16, "mixed"), (2, 256, 16, torch.bfloat16, "split8"),
    ]
    if SMOKE:
        cases = [c for c in cases if c[1] == 64]
    gen = torch.Generator().manual_seed(0)
    for qpkv, head_dim, block_size, dtype, mode in cases:
        for _trial in range(2):  # fresh random lengths and data each time
            rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
            scale_len = 16 if SMOKE else 1
            if mode == "mixed":
                specs = [(rand(0, 3000 // scale_len), rand(1, 600 // scale_len)) for _ in range(3)]
                specs += [(rand(0, 4000 // scale_len), 1) for _ in range(5)]
            else:
                specs = [(rand(0, 6000 // scale_len), 1) for _ in range(rand(1, 9))]
            kvh = 8 // qpkv if qpkv in (1, 4, 8) else 3
            batch = random_batch(specs, num_heads=kvh * qpkv, num_kv_heads=kvh, head_dim=head_dim,
                                 block_size=block_size, dtype=dtype)
            ref = dense_reference(batch, scale_of(batch))
            cache_before = batch.kv_cache.clone()
            backend = TritonAttentionBackend(decode_num_splits=8 if mode == "split8" else None)
            out = backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, scale_of(batch))
            err = rel_err(out, ref)
            err_torch = None
            if torch_ref is not None:
                out_t = torch_ref.forward(batch.query, batch.key, batch.value, cache_before, batch.metadata,
                                          scale_of(batch))
                err_torch = rel_err(out, out_t)
                if not torch.equal(cache_before, batch.kv_cache):
                    raise AssertionError("cache after the torch reference differs from the triton cache write")
            row = dict(qpkv=qpkv, head_dim=head_dim, block_size=block_size, dtype=str(dtype), mode=mode,
                       specs=specs, rel_err_dense=err, rel_err_torch_backend=err_torch)
            RESULTS["correctness"].append(row)
            print(f"[correctness] qpkv={qpkv} hd={head_dim} bs={block_size} {dtype} {mode:6s} "
                  f"err_dense={err:.2e} err_torch={err_torch if err_torch is None else f'{err_torch:.2e}'}")
            if not (err < 1e-2) or (err_torch is not None and not (err_torch < 1e-2)):
                raise AssertionError(f"correctness failed: {row}")


# ---- timing -------------------------------------------------------------------------------------

def bench_ms(fn) -> float:
    """Median milliseconds of one fn() (CUDA events; do_bench flushes L2 before each call)."""
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def graphed(fns: list):
    """A replay function running every fn once from one CUDA graph; several input sets per
    replay amortise the graph launch. Capturing also proves the calls make no host sync."""
    if SMOKE:
        return lambda: [fn() for fn in fns]
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph.replay


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.randn(1 << (20 if SMOKE else 28), dtype=torch.bfloat16, device=DEVICE)  # 512 MiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def forward_fn(backend: TritonAttentionBackend, batch: Batch):
    md = batch.metadata
    return lambda: backend.forward(batch.query, batch.key, batch.value, batch.kv_cache, md,
                                   batch.query.shape[-1] ** -0.5)


def decode_sets(batch_size: int, context_len: int, num_sets: int) -> list[Batch]:
    """num_sets decode batches over disjoint blocks of one cache (distinct memory per set)."""
    blocks_per_set = batch_size * triton.cdiv(context_len, 16)
    cache = torch.randn(num_sets * blocks_per_set + 1, 2, 16, HEADS["num_kv_heads"], HEADS["head_dim"],
                        dtype=torch.float32 if SMOKE else torch.bfloat16, device=DEVICE)
    specs = [(context_len - 1, 1)] * batch_size
    return [random_batch(specs, **HEADS, kv_cache=cache, block_offset=1 + i * blocks_per_set)
            for i in range(num_sets)]


def dense_kv(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's cached K/V as dense (num_seqs, num_kv_heads, seq_len, head_dim); equal lengths."""
    cache, md = batch.kv_cache, batch.metadata
    seq_len, block_size = batch.specs[0][0] + batch.specs[0][1], cache.shape[2]
    pos = torch.arange(seq_len, device=DEVICE)
    slots = md.block_tables[:, pos // block_size].long() * block_size + pos % block_size  # (B, seq_len)
    flat = cache.transpose(0, 1).reshape(2, -1, *cache.shape[3:])
    return flat[0, slots].transpose(1, 2).contiguous(), flat[1, slots].transpose(1, 2).contiguous()


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def bench_decode(copy_gbps: float) -> None:
    backend = TritonAttentionBackend()
    batches, contexts = ([1, 4], [64, 200]) if SMOKE else ([1, 8, 64, 256], [512, 1024, 2048, 4096, 8192])
    for batch_size in batches:
        for context_len in contexts:
            one_set = batch_size * context_len * 2 * HEADS["num_kv_heads"] * HEADS["head_dim"] * 2
            num_sets = 2 if SMOKE else max(1, min(32, triton.cdiv(64 << 20, one_set)))
            sets = decode_sets(batch_size, context_len, num_sets)
            tri_ms = bench_ms(graphed([forward_fn(backend, b) for b in sets])) / num_sets
            out = forward_fn(backend, sets[0])()  # rewrites the same new token: idempotent
            dense = [dense_kv(b) for b in sets]
            queries = [b.query.unsqueeze(2) for b in sets]  # (B, H, 1, D)
            sdpa_ms = bench_ms(graphed([lambda q=q, kv=kv: sdpa_gqa(q, *kv) for q, kv in zip(queries, dense)]))
            sdpa_ms /= num_sets
            err = rel_err(out, sdpa_gqa(queries[0], *dense[0]).squeeze(2))
            splits = choose_num_splits(batch_size, HEADS["num_kv_heads"], context_len,
                                       backend._sm_count(torch.device(DEVICE)))
            gbps, sdpa_gbps = sets[0].kv_bytes / tri_ms / 1e6, sets[0].kv_bytes / sdpa_ms / 1e6
            row = dict(batch=batch_size, context=context_len, splits=splits, triton_us=tri_ms * 1e3,
                       triton_gbps=gbps, pct_of_copy=100 * gbps / copy_gbps, sdpa_us=sdpa_ms * 1e3,
                       sdpa_gbps=sdpa_gbps, speedup_vs_sdpa=sdpa_ms / tri_ms, rel_err_vs_sdpa=err, sets=num_sets)
            RESULTS["decode"].append(row)
            print("[decode] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
            if not err < 1e-2:
                raise AssertionError(f"decode output differs from SDPA: {row}")
            del sets, dense, queries, out
            if not SMOKE:
                torch.cuda.empty_cache()


def bench_split_sweep() -> None:
    """Decode time per forced split count, to judge choose_num_splits."""
    configs = [(1, 200), (4, 200)] if SMOKE else [(1, 8192), (8, 8192), (32, 4096), (64, 4096)]
    for batch_size, context_len in configs:
        sets = decode_sets(batch_size, context_len, 1 if SMOKE else 4)
        times = {}
        for splits in (1, 2, 4, 8, 16, 32):
            backend = TritonAttentionBackend(decode_num_splits=splits)
            times[splits] = bench_ms(graphed([forward_fn(backend, b) for b in sets])) * 1e3 / len(sets)
        auto = choose_num_splits(batch_size, HEADS["num_kv_heads"], context_len,
                                 TritonAttentionBackend()._sm_count(torch.device(DEVICE)))
        best = min(times, key=times.get)
        RESULTS["splits"].append(dict(batch=batch_size, context=context_len, us=times, auto=auto, best=best))
        print(f"[splits] B={batch_size} ctx={context_len} auto={auto} best={best} "
              + " ".join(f"{s}:{t:.1f}us" for s, t in times.items()))
        del sets


def decode_kernel_fn(batch: Batch, out: torch.Tensor, num_splits: int, tile_n: int, num_warps: int,
                     num_stages: int | None):
    """The decode attention launch alone, with explicit tile parameters."""
    md = batch.metadata
    return lambda: paged_attention(out, batch.query, batch.kv_cache, md.block_tables, md.seq_lens,
                                   md.query_start_loc, batch.query.shape[-1] ** -0.5, decode_only=True, block_m=16,
                                   tile_n=tile_n, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def bench_tile_sweep() -> None:
    """Decode tile shape / warps / stages variants, each checked against the default's output."""
    variants = [(64, 4, 2), (64, 4, None), (32, 4, 2), (128, 4, 2), (64, 8, 2)]  # default first
    configs = [(4, 200)] if SMOKE else [(8, 8192), (256, 4096)]
    num_sms = TritonAttentionBackend()._sm_count(torch.device(DEVICE))
    for batch_size, context_len in configs:
        batch = decode_sets(batch_size, context_len, 1)[0]
        splits = choose_num_splits(batch_size, HEADS["num_kv_heads"], context_len, num_sms)
        times, baseline = {}, None
        for tile_n, warps, stages in variants[:2] if SMOKE else variants:
            out = torch.empty_like(batch.query)
            times[f"tile{tile_n}/w{warps}/s{stages}"] = 1e3 * bench_ms(
                graphed([decode_kernel_fn(batch, out, splits, tile_n, warps, stages)]))
            baseline = out if baseline is None else baseline
            if not rel_err(out, baseline) < 1e-2:
                raise AssertionError(f"tile variant {(tile_n, warps, stages)} disagrees with the default")
        RESULTS["tiles"].append(dict(batch=batch_size, context=context_len, splits=splits, us=times))
        print(f"[tiles] B={batch_size} ctx={context_len} splits={splits} "
              + " ".join(f"{k}:{t:.1f}us" for k, t in times.items()))


def attention_flops(specs: list[tuple[int, int]], num_heads: int, head_dim: int) -> float:
    """2 matmuls x 2 FLOP per visible (query, key) pair and head dim element."""
    pairs = sum(q * c + q * (q + 1) // 2 for c, q in specs)
    return 4.0 * pairs * num_heads * head_dim


def prefill_kernel_fn(batch: Batch, out: torch.Tensor, block_m: int, tile_n: int, num_warps: int,
                      num_stages: int | None):
    md = batch.metadata
    return lambda: paged_attention(out, batch.query, batch.kv_cache, md.block_tables, md.seq_lens,
                                   md.query_start_loc, batch.query.shape[-1] ** -0.5, decode_only=False,
                                   block_m=block_m, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages)


def bench_prefill() -> None:
    """Causal prefill (B x L fresh tokens) vs SDPA is_causal, with a tile sweep of the mixed kernel."""
    b, L = (2, 64) if SMOKE else (4, 2048)
    specs = [(0, L)] * b
    batch = random_batch(specs, **HEADS)
    backend = TritonAttentionBackend()
    out = forward_fn(backend, batch)()  # also writes the chunk's K/V into the cache
    h, kvh, d = HEADS["num_heads"], HEADS["num_kv_heads"], HEADS["head_dim"]
    q = batch.query.view(b, L, h, d).transpose(1, 2)
    k, v = (t.view(b, L, kvh, d).transpose(1, 2).contiguous() for t in (batch.key, batch.value))
    sdpa_out = sdpa_gqa(q, k, v, is_causal=True)
    err = rel_err(out, sdpa_out.transpose(1, 2).reshape(out.shape))
    flops = attention_flops(specs, h, d)
    times = {"triton_backend": bench_ms(forward_fn(backend, batch)), "sdpa": bench_ms(lambda: sdpa_gqa(q, k, v,
                                                                                                    is_causal=True))}
    variants = [(128, 64, 8, None)] if SMOKE else [
        (128, 64, 8, None), (128, 128, 8, None), (64, 64, 4, 2), (64, 128, 4, None), (128, 64, 8, 2)]
    for block_m, tile_n, warps, stages in variants:
        v_out = torch.empty_like(out)
        fn = prefill_kernel_fn(batch, v_out, block_m, tile_n, warps, stages)
        fn()
        if not rel_err(v_out, out) < 1e-2:
            raise AssertionError(f"prefill variant {(block_m, tile_n, warps, stages)} disagrees")
        times[f"m{block_m}/n{tile_n}/w{warps}/s{stages}"] = bench_ms(fn)
    row = dict(kind="causal_prefill", specs=f"{b}x{L}", rel_err_vs_sdpa=err,
               ms=times, tflops={k: flops / t / 1e9 for k, t in times.items()})
    RESULTS["prefill"].append(row)
    print(f"[prefill] {b}x{L} err={err:.2e} " + " ".join(f"{k}:{t * 1e3:.0f}us/{flops / t / 1e9:.0f}TF"
                                                          for k, t in times.items()))
    if not err < 1e-2:
        raise AssertionError("prefill output differs from SDPA")


def bench_mixed() -> None:
    """Chunks with cached context plus many decodes in one batch, vs SDPA on each part."""
    n_chunk, chunk, n_dec, dec_ctx = (2, 32, 4, 64) if SMOKE else (4, 1024, 128, 2048)
    specs = [(chunk, chunk)] * n_chunk + [(dec_ctx - 1, 1)] * n_dec
    batch = random_batch(specs, **HEADS)
    backend = TritonAttentionBackend()
    out = forward_fn(backend, batch)()
    tri_ms = bench_ms(forward_fn(backend, batch))
    ref = dense_reference(batch, batch.query.shape[-1] ** -0.5)
    err = rel_err(out, ref)
    h, kvh, d = HEADS["num_heads"], HEADS["num_kv_heads"], HEADS["head_dim"]
    chunks = Batch(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, specs[:n_chunk])
    chunks.metadata = AttentionMetadata(batch.metadata.slot_mapping, batch.metadata.block_tables[:n_chunk],
                                        batch.metadata.seq_lens[:n_chunk], batch.metadata.query_start_loc, chunk,
                                        2 * chunk, n_chunk * chunk)
    k, v = dense_kv(chunks)  # (n_chunk, kvh, 2 * chunk, d)
    k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    q = batch.query[: n_chunk * chunk].view(n_chunk, chunk, h, d).transpose(1, 2)
    mask = torch.arange(2 * chunk, device=DEVICE)[None, :] <= chunk + torch.arange(chunk, device=DEVICE)[:, None]
    decodes = Batch(batch.query, batch.key, batch.value, batch.kv_cache, batch.metadata, specs[n_chunk:])
    decodes.metadata = AttentionMetadata(batch.metadata.slot_mapping, batch.metadata.block_tables[n_chunk:],
                                         batch.metadata.seq_lens[n_chunk:], batch.metadata.query_start_loc, 1,
                                         dec_ctx, n_dec)
    dk, dv = dense_kv(decodes)
    dq = batch.query[n_chunk * chunk :].unsqueeze(2)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) + \
        bench_ms(lambda: sdpa_gqa(dq, dk, dv))
    flops = attention_flops(specs, h, d)
    row = dict(kind="mixed", specs=f"{n_chunk}x{chunk}@ctx{chunk} + {n_dec}x1@ctx{dec_ctx}", rel_err_dense=err,
               triton_ms=tri_ms, sdpa_ms=sdpa_ms, triton_tflops=flops / tri_ms / 1e9, sdpa_tflops=flops / sdpa_ms / 1e9)
    RESULTS["prefill"].append(row)
    print(f"[mixed] {row['specs']} err={err:.2e} triton={tri_ms * 1e3:.0f}us ({row['triton_tflops']:.0f} TF) "
          f"sdpa(masked chunks + gqa decodes)={sdpa_ms * 1e3:.0f}us ({row['sdpa_tflops']:.0f} TF)")
    if not err < 1e-2:
        raise AssertionError("mixed batch output differs from the dense reference")


def print_summary(copy_gbps: float) -> None:
    print(f"\n== decode, Llama-3-8B heads, block 16, bf16; copy bandwidth {copy_gbps:.0f} GB/s ==")
    print(f"{'B':>4} {'ctx':>5} {'splits':>6} {'triton us':>10} {'GB/s':>7} {'%copy':>6} {'sdpa us':>9} "
          f"{'GB/s':>7} {'speedup':>7}")
    for r in RESULTS["decode"]:
        print(f"{r['batch']:>4} {r['context']:>5} {r['splits']:>6} {r['triton_us']:>10.1f} {r['triton_gbps']:>7.0f} "
              f"{r['pct_of_copy']:>6.1f} {r['sdpa_us']:>9.1f} {r['sdpa_gbps']:>7.0f} {r['speedup_vs_sdpa']:>7.2f}")


def main() -> None:
    start = time.time()
    torch.manual_seed(0)
    name = "cpu (interpreter smoke run)" if SMOKE else torch.cuda.get_device_name()
    RESULTS["env"] = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"[env] {RESULTS['env']}", flush=True)
    check_correctness()
    copy_gbps = copy_bandwidth()
    RESULTS["copy_gbps"] = copy_gbps
    print(f"[copy] {copy_gbps:.0f} GB/s (read + write)", flush=True)
    # Most needed first: a run cut short by its time limit still has the decode table and mixed batch.
    for section in (bench_decode, bench_mixed, bench_prefill, bench_split_sweep, bench_tile_sweep):
        try:
            section(copy_gbps) if section is bench_decode else section()
        finally:
            if os.environ.get("OUT"):
                with open(os.path.join(os.environ["OUT"], "bench_attention.json"), "w") as f:
                    json.dump(RESULTS, f, indent=1, default=str)
        print(f"[time] {section.__name__} done at {time.time() - start:.0f}s", flush=True)
    print_summary(copy_gbps)


if __name__ == "__main__":
    main()

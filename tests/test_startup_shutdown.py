"""`LLM.shutdown()`, `with LLM(...)` and `del llm` free the engine: a notebook can build LLMs one after another."""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest

from pagedllm import LLM, SamplingParams

KW = dict(device="cpu", max_model_len=256, cpu_kv_cache_gib=0.25)
PARAMS = SamplingParams(max_tokens=4, temperature=0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_llms_built_in_a_row_release_memory_and_threads() -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    with LLM(**KW) as llm:  # leaving the block calls shutdown()
        first = llm.generate("Hello", PARAMS, use_tqdm=False)[0].outputs[0].text
        model = weakref.ref(llm.engine.executor.worker.model_runner.model)
        kv = weakref.ref(llm.engine.executor.worker.model_runner.kv_caches[0])
    assert model() is None and kv() is None  # nothing holds the model or the cache any more
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("Hello", PARAMS)
    llm.shutdown()  # twice is harmless

    # The first engine paid for imports and the file's page cache; from here on memory must come back.
    gc.collect()
    rss_idle = _rss_bytes()
    second = LLM(**KW)
    assert second.generate("Hello", PARAMS, use_tqdm=False)[0].outputs[0].text == first
    runner = second.engine.executor.worker.model_runner
    for layer_cache in runner.kv_caches:  # the CPU KV cache takes memory as blocks are written: write them all
        layer_cache.zero_()
    model = weakref.ref(runner.model)
    del runner
    rss_loaded = _rss_bytes()
    del second  # what a notebook does
    assert model() is None
    assert rss_loaded - rss_idle > 400 << 20  # fp32 weights + a 0.25 GiB KV cache
    assert _rss_bytes() - rss_idle < 0.15 * (rss_loaded - rss_idle)
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert not [t for t in leftover if not t.daemon or "pagedllm" in t.name], leftover

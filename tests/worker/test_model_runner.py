"""The model runner's input buffers (CPU) and its CUDA-graph decode path (GPU).

The CPU tests check what a captured graph will read: fixed-offset views of the
persistent buffers, with padding rows that write nowhere and attend to nothing.
The ``gpu`` tests run the engine end to end on a tiny random model and require
the same greedy tokens with CUDA graphs as with ``enforce_eager``.
"""

import json

import numpy as np
import pytest
import torch

from pagedllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cuda_graphs import batch_size_buckets
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.input_buffers import InputBuffers

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 997,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False}


def _input_batch() -> InputBatch:
    params = SamplingParams(temperature=0)
    batch = InputBatch(capacity=4, max_model_len=64, max_num_blocks=8, vocab_size=997, device=torch.device("cpu"))
    batch.add_request(NewRequestData("a", list(range(10, 30)), params, [7, 3], 20, [5]))  # decode at position 20
    batch.add_request(NewRequestData("b", list(range(40, 45)), params, [9], 0))  # prefill of 5 tokens
    return batch


def test_buckets() -> None:
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_buckets(256)[-3:] == [240, 248, 256]


def test_input_buffers_eager_layout() -> None:
    batch = _input_batch().prepare({"a": 1, "b": 5}, block_size=16)
    buffers = InputBuffers(max_num_tokens=32, max_num_seqs=4, max_num_blocks=8, device=torch.device("cpu"))
    input_ids, positions, md, logits_indices = buffers.load(batch)
    assert input_ids.tolist() == [5, 40, 41, 42, 43, 44]
    assert positions.tolist() == [20, 0, 1, 2, 3, 4]
    assert md.slot_mapping.tolist() == [3 * 16 + 4] + [9 * 16 + i for i in range(5)]
    assert md.seq_lens.tolist() == [21, 5]
    assert md.query_start_loc.tolist() == [0, 1, 6]
    assert md.block_tables.tolist() == [[7, 3], [9, 0]]
    assert logits_indices.tolist() == [0, 5]
    assert md.num_actual_tokens == 6 and md.max_query_len == 5


def test_input_buffers_padded_decode_and_reuse() -> None:
    """A padded decode batch after a wider one: stale values must not leak into what is read."""
    input_batch = _input_batch()
    buffers = InputBuffers(max_num_tokens=32, max_num_seqs=4, max_num_blocks=8, device=torch.device("cpu"))
    first = input_batch.prepare({"a": 1, "b": 5}, 16)
    buffers.load(first)
    input_batch.append_sampled(first, np.array([6, 77]))
    input_batch.update_states(SchedulerOutput([], [CachedRequestData("b", False, [], 5)], {"b": 1}, 1, set()))
    batch = input_batch.prepare({"b": 1}, 16)
    _, _, no_md, logits_indices = buffers.load(batch, pad_to=4)
    assert no_md is None  # a graph replay reads the views it captured
    # What a graph captured at batch 4 reads: fixed views of the buffers, holding this step's data.
    input_ids, positions = buffers.token_views(4)
    md = buffers.metadata(4, 4, 8, max_query_len=1, max_seq_len=1024)
    assert input_ids.tolist() == [77, 0, 0, 0]
    assert positions.tolist() == [5, 0, 0, 0]
    assert md.slot_mapping.tolist() == [9 * 16 + 5, -1, -1, -1]
    assert md.seq_lens.tolist() == [6, 0, 0, 0]
    assert md.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert md.block_tables.shape == (4, 8) and md.block_tables[0, 0] == 9
    assert logits_indices.tolist() == [0]
    # Fixed offsets: an eager load of the same batch reads the same memory.
    eager_ids, _, eager_md, _ = buffers.load(batch)
    assert eager_md.seq_lens.data_ptr() == md.seq_lens.data_ptr()
    assert eager_md.block_tables.data_ptr() == md.block_tables.data_ptr()
    assert eager_ids.data_ptr() == input_ids.data_ptr()


def test_input_buffers_reject_oversized_batch() -> None:
    batch = _input_batch().prepare({"a": 1, "b": 5}, 16)
    with pytest.raises(ValueError, match="exceeds the input buffers"):
        InputBuffers(max_num_tokens=32, max_num_seqs=1, max_num_blocks=8, device=torch.device("cpu")).load(batch)


# ---- GPU ---------------------------------------------------------------------------------------

def _generate(model_dir: str, enforce_eager: bool, dtype: str) -> tuple[list[list[int]], int]:
    from pagedllm import LLM

    llm = LLM(model=model_dir, load_format="dummy", dtype=dtype, skip_tokenizer_init=True, device="cuda",
              max_num_seqs=20, max_model_len=512, num_gpu_blocks_override=256, enforce_eager=enforce_eager)
    runner = llm.engine.executor.worker.model_runner
    replays = 0
    if runner.graphs is not None:
        run = runner.graphs.run

        def counting_run(batch):
            nonlocal replays
            replays += 1
            return run(batch)

        runner.graphs.run = counting_run
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY["vocab_size"], size=n).tolist() for n in (37, 5, 120)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 8, 16)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm, runner
    torch.cuda.empty_cache()
    return tokens, replays


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tmp_path) -> None:
    """3 requests replay the batch-4 graph (one padding row), then 2 and 1 as the shorter ones finish.

    fp32, so that a padded batch choosing another GEMM kernel cannot flip a near-tie of bf16 logits."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    eager, no_replays = _generate(str(tmp_path), True, "float32")
    graphed, replays = _generate(str(tmp_path), False, "float32")
    assert no_replays == 0 and replays >= 20
    assert [len(t) for t in eager] == [24, 8, 16]
    assert graphed == eager


def test_kv_cache_shape_is_per_tensor_parallel_rank(tmp_path) -> None:
    """A rank of a tensor-parallel group holds num_kv_heads / tp_size heads of every KV block."""
    from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig
    from pagedllm.loader import resolve_model
    from pagedllm.models.layers.parallel import ParallelState
    from pagedllm.worker.model_runner import ModelRunner

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    config = ModelConfig(model=str(tmp_path), load_format="dummy", dtype="float32")
    resolve_model(config)
    args = (config, CacheConfig(block_size=16), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                                max_model_len=128), DeviceConfig(device="cpu"))
    whole = ModelRunner(*args, torch.device("cpu"))
    half = ModelRunner(*args, torch.device("cpu"), parallel=ParallelState(tp_size=2))
    layers, shape = whole.kv_cache_shape(8)
    assert half.kv_cache_shape(8) == (layers, (8, 2, 16, TINY["num_key_value_heads"] // 2, shape[-1]))
    assert shape[3] == TINY["num_key_value_heads"]
    assert 2 * half.kv_cache_bytes_per_block() == whole.kv_cache_bytes_per_block()


def _tiny_llm(tmp_path, **kwargs):
    from pagedllm import LLM

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return LLM(model=str(tmp_path), load_format="dummy", dtype="float32", skip_tokenizer_init=True,
               max_model_len=256, seed=0, **kwargs)


def test_prefill_warm_up_leaves_no_trace(tmp_path) -> None:
    """The warm-up's synthetic prompts write KV blocks before any request: with prefix caching on, later
    requests must generate exactly what an engine that never warmed up does."""
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cold = _tiny_llm(tmp_path)
    expected = [o.outputs[0].token_ids for o in cold.generate(prompts, params, use_tqdm=False)]
    del cold
    warm = _tiny_llm(tmp_path)
    runner = warm.engine.executor.worker.model_runner
    before = warm.engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    runner.warm_up_prefill()
    assert warm.engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == before
    assert [o.outputs[0].token_ids for o in warm.generate(prompts, params, use_tqdm=False)] == expected


def _compiled_variants() -> set[str]:
    from pagedllm.attention import triton_paged_attention as tpa

    return {f"{kernel.fn.__name__}: {key}" for kernel in (tpa._paged_attention_kernel, tpa._reshape_and_cache_kernel)
            for cache in kernel.device_caches.values() for key in cache[0]}


@pytest.mark.gpu
def test_no_attention_kernel_compiles_while_serving(tmp_path) -> None:
    """Start-up compiles every variant of the attention kernels a workload can need (the prefill
    warm-up and the graph capture): mixed batches of new lengths and sizes compile nothing more."""
    llm = _tiny_llm(tmp_path, max_num_seqs=32)
    after_start = _compiled_variants()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for sizes in ((3,), (1, 70), (9, 9, 9), tuple(range(1, 34)), (200, 2, 5, 33)):
        llm.generate([{"prompt_token_ids": [7] * n} for n in sizes], params, use_tqdm=False)
    new = sorted(_compiled_variants() - after_start)
    assert not new, f"{len(new)} variants compiled while serving: {new}"

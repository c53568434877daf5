"""The engine's memory-sharing paths on a GPU: swap preemption (pinned CPU swap space), forked samples
(copy-on-write block copies on the device), beam search, with CUDA graphs on. Tiny random Llama, fp32."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, BeamSearchParams, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return str(path)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _llm(model_dir: str, **kw) -> LLM:
    # A fixed, small cache: several engines live at once in these tests (no profiling grabs 90% of the GPU).
    kw.setdefault("num_gpu_blocks_override", 512)
    return LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
               block_size=16, **kw)


def test_swap_and_graphs_match_unpressured_eager(model_dir: str) -> None:
    prompts = _prompts(24)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in _llm(model_dir, enforce_eager=True).generate(prompts, params,
                                                                                        use_tqdm=False)]
    llm = _llm(model_dir, num_gpu_blocks_override=40, preemption_mode="swap", swap_space=0.01,
               enable_prefix_caching=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_forked_samples_and_beams_on_gpu(model_dir: str) -> None:
    llm = _llm(model_dir, enable_prefix_caching=False)
    prompt = _prompts(1)[0] + [9] * 21  # not a block multiple: copy-on-write of the last block
    group = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0]
    for i, out in enumerate(group.outputs):
        alone = llm.generate([prompt], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
        assert out.token_ids == alone.token_ids
    eager = _llm(model_dir, enforce_eager=True, enable_prefix_caching=False)
    params = BeamSearchParams(beam_width=4, max_tokens=10)
    assert llm.beam_search([prompt], params)[0].sequences[0].tokens == \
        eager.beam_search([prompt], params)[0].sequences[0].tokens


def _repetitive_prompts(n: int) -> list[list[int]]:
    """Prompts with a repeated span, so n-gram drafts exist and get accepted."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        span = torch.randint(3, 256, (8,), generator=g).tolist()
        out.append([1] + span * 3 + torch.randint(3, 256, (4,), generator=g).tolist())
    return out


def test_ngram_speculation_matches_plain_greedy_on_gpu(model_dir: str) -> None:
    """Verification steps (multi-token decode queries in the Triton attention, eager) beside graphed decodes:
    greedy tokens identical to the plain engine, drafts accepted, no block leaked."""
    prompts = _repetitive_prompts(12) + _prompts(12)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in _llm(model_dir).generate(prompts, params, use_tqdm=False)]
    spec = _llm(model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                               "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == plain
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0
    kv = spec.engine.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks


def test_shutdown_frees_gpu_memory_for_a_second_engine(model_dir: str) -> None:
    """`LLM.shutdown()` gives the weights and the profiled KV cache back: a second engine profiles the same
    number of blocks (before, the first engine's cache was still held and the second found no room)."""
    import gc

    first = LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
                gpu_memory_utilization=0.5)
    blocks = first.engine.scheduler.kv_cache_manager.num_blocks
    first.shutdown()
    del first
    gc.collect()
    assert torch.cuda.memory_allocated() < 256 * 1024**2
    with LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
             gpu_memory_utilization=0.5) as second:
        assert second.engine.scheduler.kv_cache_manager.num_blocks >= 0.95 * blocks
        out = second.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                              use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4

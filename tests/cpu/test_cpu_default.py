"""End to end: `LLM()` on the CPU runs the fast path (bf16 weights, cpu_sdpa) and still answers like fp32."""

import logging

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.attention.cpu_sdpa import CpuSdpaAttentionBackend
from tests.reference import hf_log_softmax


def test_default_llm_on_cpu_is_the_fast_path_and_close_to_fp32(caplog):
    with caplog.at_level(logging.INFO, logger="pagedllm.config"):
        llm = LLM(device="cpu", max_model_len=256)
    assert any("CPU fast path" in r.getMessage() for r in caplog.records)
    runner = llm.engine.executor.worker.model_runner
    model = runner.model
    assert isinstance(runner.attn_backend, CpuSdpaAttentionBackend)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16 and runner.kv_caches[0].dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, prompt_logprobs=0)
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    ref = hf_log_softmax(ids)  # HF transformers fp32: ref[i] is the distribution of token i + 1
    # bf16 weights move logprobs by ~1e-2; a wrong layout or a broken kernel moves them by whole units.
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        (token, lp), = entry.items()
        assert abs(lp.logprob - float(ref[i, token])) < 0.15, (i, lp.logprob, float(ref[i, token]))


def test_fast_path_tokens_do_not_depend_on_how_the_context_was_computed():
    """The fast path's KV cache is bf16; a fresh prefill attends to its own K/V rounded as the cache holds them,
    so a prompt gives the same greedy tokens prefilled in one step, in chunks that read earlier chunks back
    from the cache, or after a prefix-cache hit."""
    prompt = ("Summarize: the village by the sea had seven robots, a library, three gardens and a small tea "
              "house where the robots discussed rivers, mountains and the long history of bread. ") * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def tokens(llm: LLM) -> list[int]:
        return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    whole = tokens(LLM(device="cpu", max_model_len=512, enable_prefix_caching=False))
    chunked_llm = LLM(device="cpu", max_model_len=512, enable_prefix_caching=False, max_num_batched_tokens=24)
    assert chunked_llm.engine.executor.worker.model_runner.kv_caches[0].dtype == torch.bfloat16
    assert tokens(chunked_llm) == whole
    cached = LLM(device="cpu", max_model_len=512)
    assert tokens(cached) == whole
    again = cached.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == whole

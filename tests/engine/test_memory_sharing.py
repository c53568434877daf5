"""Memory sharing and preemption modes: forked parallel samples (copy-on-write), beam search
against HF transformers, swap preemption, priority scheduling. Real models on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.loader import default_model_path

PROMPTS = ["The best way to learn a language is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu", dtype="float32", max_model_len=512, block_size=16, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(default_model_path())
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def _pool_empty(llm: LLM) -> bool:
    kv = llm.engine.scheduler.kv_cache_manager
    return kv.block_pool.get_num_free_blocks() == kv.num_blocks and not llm.engine.scheduler.requests


def _run_tracking_peak(llm: LLM, add) -> tuple[int, list[tuple[int, int]]]:
    """Run requests added by `add(engine)`; return the peak blocks in use and every block copy made."""
    eng, kv = llm.engine, llm.engine.scheduler.kv_cache_manager
    add(eng)
    peak, copies = 0, []
    orig = eng.scheduler.schedule

    def schedule():
        out = orig()
        copies.extend(out.blocks_to_copy)
        return out

    eng.scheduler.schedule = schedule
    try:
        while eng.has_unfinished_requests():
            eng.step()
            peak = max(peak, kv.num_blocks - kv.block_pool.get_num_free_blocks())
    finally:
        del eng.scheduler.schedule
    return peak, copies


def test_parallel_samples_share_prompt_blocks_copy_on_write(llm: LLM) -> None:
    prompt = " ".join(["a story about the sea and"] * 9)  # not a multiple of the block size
    n = 4
    params = SamplingParams(n=n, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    group = llm.generate(prompt, params, use_tqdm=False)[0]
    # Each sample equals a separate request with the child's seed (seed + index).
    for i, out in enumerate(group.outputs):
        alone = llm.generate(prompt, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
        assert out.token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in group.outputs}) > 1

    shared_peak, copies = _run_tracking_peak(llm, lambda e: e.add_request("g", prompt, params))
    separate = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    sep_peak, _ = _run_tracking_peak(llm, lambda e: [e.add_request(f"s{i}", prompt, separate) for i in range(n)])
    assert copies, "the partly filled last prompt block must be copied on write"
    num_prompt_blocks = len(llm.get_tokenizer().encode(prompt)) // 16
    assert sep_peak - shared_peak >= (n - 1) * num_prompt_blocks - 1
    assert _pool_empty(llm)


@pytest.mark.parametrize("width,max_tokens", [(4, 10), (2, 16)])
def test_beam_search_matches_hf_on_default_model(llm: LLM, hf_smollm2, width: int, max_tokens: int) -> None:
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = PROMPTS + [chat]  # the chat prompt ends in EOS well before max_tokens
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=max_tokens))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf_smollm2.generate(ids, num_beams=width, max_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0].tolist()
        assert out.sequences[0].tokens == ref, prompt
        assert len(out.sequences) == width
        scores = [s.score for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        for seq in out.sequences:
            assert (seq.finish_reason == "stop") == (seq.tokens[-1] == tok.eos_token_id)
    if width == 4:
        assert outs[-1].sequences[0].finish_reason == "stop"  # the EOS path was taken
    assert _pool_empty(llm)


def test_beam_search_matches_hf_on_tiny_random_model(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)  # peaked next-token distributions: no near-ties between beams
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", skip_tokenizer_init=True, block_size=16)
    prompts = [[1, 5, 9, 33, 60, 7], [1] + list(range(10, 40)), [1, 70]]
    for width in (3, 4):
        outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=12))
        for prompt, out in zip(prompts, outs):
            ref = hf.generate(torch.tensor([prompt]), num_beams=width, max_new_tokens=12, do_sample=False,
                              eos_token_id=2, pad_token_id=0)[0].tolist()
            assert out.sequences[0].tokens == ref
            for seq in out.sequences:  # EOS (id 2) ends a beam with "stop"; the rest ran to max_tokens
                assert seq.finish_reason == ("stop" if seq.tokens[-1] == 2 else "length")
    assert _pool_empty(llm)


def test_beam_search_shares_blocks(llm: LLM) -> None:
    prompt = PROMPTS[2] * 4
    width = 4
    eng = llm.engine
    peak_beam, copies = _run_tracking_peak(
        llm, lambda e: e.add_beam_search_request("b", prompt, BeamSearchParams(beam_width=width, max_tokens=24)))
    eng.beam_search.pop_output("b")
    same_work = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    peak_sep, _ = _run_tracking_peak(llm, lambda e: [e.add_request(f"w{i}", prompt, same_work)
                                                     for i in range(width)])
    assert copies and peak_beam < peak_sep
    assert _pool_empty(llm)


def test_swap_preemption_gives_identical_outputs() -> None:
    prompts = [f"Item {i}: the history of " + "very " * (i % 7) + "old maps" for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref_llm = LLM(device="cpu", dtype="float32", max_model_len=256, block_size=16)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, params, use_tqdm=False)]
    del ref_llm
    llm = LLM(device="cpu", dtype="float32", max_model_len=256, block_size=16, num_gpu_blocks_override=14,
              preemption_mode="swap", swap_space=0.05, enable_prefix_caching=False)
    sched = llm.engine.scheduler
    swapped_out = []
    orig = sched.schedule

    def schedule():
        out = orig()
        swapped_out.extend(out.blocks_to_swap_out)
        return out

    sched.schedule = schedule
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sched.num_preemptions > 0 and swapped_out, "the small cache should force swapping"
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert _pool_empty(llm) and not sched.cpu_block_pool.req_to_blocks
    num_cpu_blocks = len(llm.engine.executor.worker.model_runner.swap_space.cpu_caches[0])
    assert sched.cpu_block_pool.get_num_free_blocks() == num_cpu_blocks


def test_priority_scheduling_runs_urgent_requests_first() -> None:
    llm = LLM(device="cpu", dtype="float32", max_model_len=256, block_size=16, max_num_seqs=1,
              scheduling_policy="priority")
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for rid, prio in [("low1", 5), ("low2", 5), ("urgent", 0), ("mid", 2)]:
        eng.add_request(rid, "Hello there", params, priority=prio)
    order = []
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["urgent", "mid", "low1", "low2"]


def test_beam_search_under_cache_pressure_completes_and_matches(llm: LLM) -> None:
    """Paused beams must not hold the blocks a waiting beam needs when nothing else runs (no deadlock)."""
    prompts = ["The history of the old lighthouse on the northern coast of the island is " * 2,
               "def quicksort(arr):", "My favourite recipe for a quick dinner is"]
    params = BeamSearchParams(beam_width=4, max_tokens=16)
    small = LLM(device="cpu", dtype="float32", max_model_len=256, block_size=16, num_gpu_blocks_override=14,
                enable_prefix_caching=False)
    eng = small.engine
    for i, p in enumerate(prompts):
        eng.add_beam_search_request(str(i), p, params)
    for _ in range(500):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    assert not eng.has_unfinished_requests(), "beam search stalled under cache pressure"
    got = [eng.beam_search.pop_output(str(i)).sequences[0].tokens for i in range(len(prompts))]
    assert got == [o.sequences[0].tokens for o in llm.beam_search(prompts, params)]
    assert _pool_empty(small)

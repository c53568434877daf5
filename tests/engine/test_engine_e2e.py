"""End-to-end engine behaviour on the real default model (SmolLM2-135M GGUF, fp32 CPU)."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams

WORDS = ("the cat sat on a mat while seven old robots argued about rivers mountains and the price of tea "
         "in a small village near the sea where nobody ever writes letters anymore").split()


def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def llm() -> LLM:
    # Small cache and budget: 48 requests cannot all fit, long prompts are chunked. fp32: the exact checks
    # below hold in fp32 only; the CPU fast path (bf16 weights) is not bitwise batch-invariant (docs/CPU.md).
    return LLM(device="cpu", dtype="float32", max_model_len=1024, num_gpu_blocks_override=48, block_size=16,
               max_num_seqs=48, max_num_batched_tokens=96)


def _assert_pool_empty(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks
    assert not llm.engine.scheduler.requests
    assert not llm.engine.has_unfinished_requests()


def test_batch_invariance_with_preemption_and_prefix_sharing(llm: LLM) -> None:
    rng = random.Random(0)
    shared = [_prompt(rng, 60), _prompt(rng, 45)]
    prompts = []
    for i in range(48):
        if i % 3 == 0:
            prompts.append(shared[i % 2] + " " + _prompt(rng, rng.randint(1, 10)))
        else:
            prompts.append(_prompt(rng, rng.randint(3, 70)))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    before = llm.engine.scheduler.num_preemptions
    hits_before = llm.engine.scheduler.kv_cache_manager.stats.hits
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > before, "the small cache should force preemption"
    assert llm.engine.scheduler.kv_cache_manager.stats.hits > hits_before, "shared prefixes should hit the cache"
    _assert_pool_empty(llm)
    for prompt, out in zip(prompts, batched):
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
        assert out.outputs[0].text == alone.outputs[0].text
        assert len(out.outputs[0].token_ids) == 10
        assert out.outputs[0].finish_reason == "length"
    _assert_pool_empty(llm)


def test_stop_string_across_token_boundary(llm: LLM) -> None:
    prompt = "Once upon a time, in a land far away,"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    out = base.outputs[0]
    tok = llm.get_tokenizer()
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode(out.token_ids[:i]) for i in range(len(out.token_ids) + 1)]
    k = next(i for i in range(4, len(pieces) - 2) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    start = len(pieces[k]) - 1
    stop = out.text[start:start + 4]
    assert len(stop) == 4
    first = out.text.find(stop)
    res = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert res.text == out.text[:first]
    assert res.finish_reason == "stop" and res.stop_reason == stop
    inc = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert inc.text == out.text[:first + len(stop)]
    _assert_pool_empty(llm)


def test_seeded_sampling_is_batch_invariant(llm: LLM) -> None:
    prompt = "Write a short poem about the sea."
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=99, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12)]
    outs = llm.generate(["Hello there", prompt, "A list of fruits:", "Tell me about cats"],
                        [others[0], seeded, others[1], others[2]], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    different = llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=12,
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_n_samples_best_of_and_logprobs(llm: LLM) -> None:
    out = llm.generate("The capital of France is", SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=6,
                                                                   logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.token_ids) == 6 and len(o.logprobs) == 6
        for tok, entry in zip(o.token_ids, o.logprobs):
            assert tok in entry and len(entry) <= 3
            assert all(lp.logprob <= 0 for lp in entry.values())
        assert o.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(o.token_ids, o.logprobs)),
                                                     abs=1e-4)
    best = llm.generate("The capital of France is", SamplingParams(n=2, best_of=4, temperature=1.0, seed=3,
                                                                    max_tokens=5, ignore_eos=True),
                        use_tqdm=False)[0]
    assert len(best.outputs) == 2
    _assert_pool_empty(llm)


def test_greedy_logprobs_rank_one_and_prompt_logprobs(llm: LLM) -> None:
    out = llm.generate("One, two, three, four,", SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                 prompt_logprobs=2), use_tqdm=False)[0]
    for tok, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert entry[tok].rank == 1
        assert entry[tok].logprob == pytest.approx(max(lp.logprob for lp in entry.values()))
    plp = out.prompt_logprobs
    ids = out.prompt_token_ids
    assert plp[0] is None and len(plp) == len(ids)
    # Reference through another path: the prompt logprob at position i (read from one prefill over the whole
    # prompt) is the sample logprob of the next token after the prefix ids[:i] (the last row of a shorter prefill).
    prefixes = [ids[:i] for i in range(1, len(ids))]
    refs = llm.generate(prefixes, SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
    for i, (entry, ref_out) in enumerate(zip(plp[1:], refs, strict=True), start=1):
        ref = ref_out.outputs[0].logprobs[0]  # the top 20 (and the sampled token) after ids[:i]
        top2 = sorted(ref.items(), key=lambda kv: -kv[1].logprob)[:2]
        assert set(entry) == {ids[i]} | {tok for tok, _ in top2}, i
        for tok, lp in top2:
            assert entry[tok].rank == lp.rank and entry[tok].logprob == pytest.approx(lp.logprob, abs=1e-4)
        if ids[i] in ref:  # the prompt's own token, if it is within the top 20
            assert entry[ids[i]].rank == ref[ids[i]].rank
            assert entry[ids[i]].logprob == pytest.approx(ref[ids[i]].logprob, abs=1e-4)
        else:
            assert entry[ids[i]].rank > 20


def test_min_tokens_max_tokens_and_token_prompts(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode("Hi")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=7, min_tokens=7), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids and len(out.outputs[0].token_ids) == 7
    assert tok.eos_token_id not in out.outputs[0].token_ids
    # vLLM's TokensPrompt / TextPrompt dicts give the same tokens as the plain forms.
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    as_dicts = llm.generate([{"prompt_token_ids": ids}, {"prompt": "Hi"}], greedy, use_tqdm=False)
    plain = llm.generate([ids, "Hi"], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in as_dicts] == [o.outputs[0].token_ids for o in plain]
    assert as_dicts[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"text": "Hi"}, greedy, use_tqdm=False)


def test_eos_stops_generation(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                   use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.get_tokenizer().eos_token_id
    assert out.text and "<|im_end|>" not in out.text


def test_bad_input_is_a_value_error_and_engine_survives(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate("hello " * 1100, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="token id"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="KV cache blocks"):
        llm.generate("hi", SamplingParams(max_tokens=900), use_tqdm=False)
    ok = llm.generate("hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
    _assert_pool_empty(llm)

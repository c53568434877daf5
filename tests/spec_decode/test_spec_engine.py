"""Speculative decoding end to end in the engine (CPU, fp32): n-gram drafts verified by the real model.

Oracle: greedy output is token-identical with and without speculation (tiny random
Llama under KV-cache pressure, and the default model on input-grounded prompts with
stop strings); seeded sampling is reproducible; n > 1, best_of and beam search keep
working; every block is back in the pool afterwards.
"""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams
from tests.tiny_llama import save_tiny_llama

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    # N(0, 0.1): peaked distributions, so greedy output falls into loops n-grams find
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_spec"))


def _tiny(path: str, spec: dict | None, **kwargs) -> LLM:
    return LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True, block_size=16, max_model_len=256,
               speculative_config=spec, **kwargs)


def _assert_pool_empty(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks
    assert not kv.req_to_blocks and not llm.engine.scheduler.requests


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [1] + [rng.randrange(3, 256) for _ in range(20)]
    out = []
    for i in range(n):
        body = [rng.randrange(3, 256) for _ in range(rng.randint(2, 30))]
        if i % 3 == 1:  # a repeated span: prompt lookup has something to find
            body = body[:8] * 3
        out.append((shared if i % 3 == 0 else [1]) + body)
    return out


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_tiny_greedy_identical_under_pressure(tiny_dir: str) -> None:
    prompts = _prompts(0, 12)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.7,
                             stop_token_ids=[rng.randrange(3, 256)] if rng.random() < 0.3 else None)
              for _ in prompts]
    pressure = dict(num_gpu_blocks_override=12, max_num_batched_tokens=48, max_num_seqs=8)
    plain = _tiny(tiny_dir, None, **pressure)
    spec = _tiny(tiny_dir, NGRAM, **pressure)
    expected = _tokens(plain.generate(prompts, params, use_tqdm=False))
    assert _tokens(spec.generate(prompts, params, use_tqdm=False)) == expected
    sched = spec.engine.scheduler
    assert sched.num_preemptions > 0 and sched.kv_cache_manager.stats.hits > 0
    stats = sched.spec_stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    _assert_pool_empty(spec)
    # Swap preemption too.
    swap = _tiny(tiny_dir, NGRAM, preemption_mode="swap", swap_space=0.001, **pressure)
    assert _tokens(swap.generate(prompts, params, use_tqdm=False)) == expected
    _assert_pool_empty(swap)


def test_tiny_sampling_features_with_speculation(tiny_dir: str) -> None:
    spec = _tiny(tiny_dir, {"num_speculative_tokens": 3})
    prompts = _prompts(2, 3)
    seeded = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                            frequency_penalty=0.2, seed=11, logprobs=2, max_tokens=24, min_tokens=5)
    a = spec.generate(prompts, seeded, use_tqdm=False)
    b = spec.generate(prompts, seeded, use_tqdm=False)
    assert _tokens(a) == _tokens(b), "seeded sampling must be reproducible with speculation"
    for out in a:
        comp = out.outputs[0]
        assert len(comp.logprobs) == len(comp.token_ids) >= 5
        assert all(tok in lp for tok, lp in zip(comp.token_ids, comp.logprobs))
    many = spec.generate(prompts[:2], SamplingParams(temperature=1.0, n=2, best_of=3, max_tokens=12, seed=3),
                         use_tqdm=False)
    assert all(len(o.outputs) == 2 and all(c.token_ids for c in o.outputs) for o in many)
    beams = BeamSearchParams(beam_width=2, max_tokens=8)
    plain = _tiny(tiny_dir, None)
    assert ([s.tokens for s in spec.beam_search([prompts[1]], beams)[0].sequences]
            == [s.tokens for s in plain.beam_search([prompts[1]], beams)[0].sequences])
    _assert_pool_empty(spec)


GROUNDED = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# The same two functions again:\n"
    "def add(a, b):\n",
    "Names: Alice Smith, Bob Jones, Carol White, Dan Brown.\nThe same names, one per line:\nAlice Smith\n",
]


def test_default_model_greedy_identical_with_stop_strings() -> None:
    plain = LLM(device="cpu", max_model_len=512)
    spec = LLM(device="cpu", max_model_len=512, speculative_config=NGRAM)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = plain.generate(GROUNDED, params, use_tqdm=False)
    got = spec.generate(GROUNDED, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in base]
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0
    # A stop string a few tokens into each output falls inside accepted runs: the output must end at the
    # token that completes it (the plain run's tokens up to there), with the text cut before it.
    tok = spec.get_tokenizer()
    stops = [o.outputs[0].text[6:12] for o in base]
    have = spec.generate(GROUNDED, [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
                                    for stop in stops], use_tqdm=False)
    for b, h, stop in zip(base, have, stops):
        ids = h.outputs[0].token_ids
        assert h.outputs[0].finish_reason == "stop" and h.outputs[0].stop_reason == stop
        assert ids == b.outputs[0].token_ids[:len(ids)]
        assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
        assert h.outputs[0].text == b.outputs[0].text[:b.outputs[0].text.index(stop)]
    _assert_pool_empty(spec)


def test_grammar_requests_beside_speculating_ones() -> None:
    """A grammar constrains only the next token, so its requests get no drafts; in a step where other
    requests verify drafts, the rejection sampler still applies the grammar's mask to their rows."""
    import json

    import jsonschema

    from pagedllm.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    spec = LLM(device="cpu", max_model_len=512, speculative_config=NGRAM)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    prompts = GROUNDED[:2] + ["Is the sky blue? Answer in JSON."]
    outs = spec.generate(prompts, [free, free, constrained], use_tqdm=False)
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0, "the free requests should speculate"
    jsonschema.validate(json.loads(outs[2].outputs[0].text), schema)
    _assert_pool_empty(spec)

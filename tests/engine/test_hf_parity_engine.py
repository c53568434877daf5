"""LLM.generate against HF transformers on the default model (SmolLM2-135M GGUF, both fp32 on CPU).

Greedy token ids must be identical to HF `generate`; sample and prompt logprobs must equal HF's
log-softmax of the same positions within LOGPROB_TOL. Observed (fp32, x86 CPU, two prompts, top-5 of
every prompt and sampled position): at most 2.3e-5; the tolerance leaves a ~9x margin for other CPUs
and BLAS builds.
"""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams
from tests.reference import hf_greedy, hf_log_softmax, offline_llm

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 12
LOGPROB_TOL = 2e-4


@pytest.fixture(scope="module")
def llm():
    return offline_llm()


def test_greedy_generate_matches_hf(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(out.prompt_token_ids, MAX_TOKENS), out.prompt


def test_sample_and_prompt_logprobs_match_hf_log_softmax(llm):
    k = 5
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=8, logprobs=k, prompt_logprobs=k, ignore_eos=True)
    out = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    sample = out.outputs[0]
    ids = out.prompt_token_ids + sample.token_ids
    ref = hf_log_softmax(ids)  # ref[i]: the distribution of token i + 1
    errors = []
    # Prompt logprobs: none for the first token, then every prompt token and its top k.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    steps = list(zip(range(1, len(ids)), out.prompt_logprobs[1:] + sample.logprobs, strict=True))
    for pos, step in steps:
        token = ids[pos]
        want = ref[pos - 1]
        top = want.topk(k)
        assert set(top.indices.tolist()) <= set(step), f"position {pos}: top-{k} token ids differ from HF's"
        assert token in step
        for token_id, logprob in step.items():
            errors.append(abs(logprob.logprob - want[token_id].item()))
        assert step[token].rank == int((want > want[token]).sum()) + 1  # rank 1: the most likely token
    assert max(errors) < LOGPROB_TOL, f"max |logprob - HF| = {max(errors):.2e}"
    assert sample.cumulative_logprob == pytest.approx(sum(s[t].logprob for t, s in zip(sample.token_ids,
                                                                                          sample.logprobs)))

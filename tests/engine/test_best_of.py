"""best_of: of best_of seeded samples, the n with the highest cumulative logprob come back, best first."""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams
from tests.reference import offline_llm

PROMPT = "My favourite animal is"


def test_best_of_keeps_the_n_samples_with_the_highest_cumulative_logprob():
    llm = offline_llm()
    common = dict(temperature=1.0, seed=123, max_tokens=6, logprobs=0)
    # Sample i of a seeded request uses seed + i, so n=5 shows the five candidates best_of=5 ranks.
    candidates = llm.generate(PROMPT, SamplingParams(n=5, **common), use_tqdm=False)[0].outputs
    for c in candidates:
        assert c.cumulative_logprob == pytest.approx(sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs)),
                                                     abs=1e-4)
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)
    assert ranked[1].cumulative_logprob > ranked[2].cumulative_logprob + 1e-3, "pick a seed without near-ties"

    best = llm.generate(PROMPT, SamplingParams(n=2, best_of=5, **common), use_tqdm=False)[0].outputs
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    assert [c.cumulative_logprob for c in best] == pytest.approx([c.cumulative_logprob for c in ranked[:2]])

    # Without logprobs asked for, the same two come back (ranked internally), with no logprobs shown.
    plain = dict(common, logprobs=None)
    quiet = llm.generate(PROMPT, SamplingParams(n=2, best_of=5, **plain), use_tqdm=False)[0].outputs
    assert [c.token_ids for c in quiet] == [c.token_ids for c in ranked[:2]]
    assert all(c.cumulative_logprob is None and c.logprobs is None for c in quiet)

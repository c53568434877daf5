"""The n-gram (prompt lookup) proposer and SpeculativeConfig, on plain token-id lists."""

from __future__ import annotations

import numpy as np
import pytest

from pagedllm.spec_decode import NgramProposer, Proposer, SpeculativeConfig


def _proposer(k: int = 3, lo: int = 1, hi: int = 4) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi))


def test_continues_the_earlier_occurrence_of_the_suffix() -> None:
    #        a  b  c  d  x  y  a  b  c
    tokens = [1, 2, 3, 4, 8, 9, 1, 2, 3]
    assert _proposer(k=3).propose([tokens]) == [[4, 8, 9]]
    assert _proposer(k=10).propose([tokens]) == [[4, 8, 9, 1, 2, 3]]  # stops at the end of the tokens


def test_longest_ngram_wins_then_earliest_match() -> None:
    # suffix "5 1 2": the 3-gram matches at index 4 (-> 7); the 1-gram "2" alone would match at index 1 (-> 6)
    tokens = [1, 2, 6, 0, 5, 1, 2, 7, 5, 1, 2]
    assert _proposer(k=1).propose([tokens]) == [[7]]
    # Two earlier matches of "1 2": the earliest one is continued.
    assert _proposer(k=2, hi=2).propose([[1, 2, 3, 0, 1, 2, 4, 1, 2]]) == [[3, 0]]


def test_no_match_or_too_short_gives_an_empty_draft() -> None:
    proposer = _proposer(lo=2)
    assert proposer.propose([[1, 2, 3, 4], [7], [], [5, 5]]) == [[], [], [], []]
    assert _proposer(lo=1).propose([[5, 5]]) == [[5]]  # "5" occurred before the last token


def test_accepts_numpy_arrays_and_drafts_per_request() -> None:
    proposer = _proposer(k=2)
    drafts = proposer.propose([np.array([3, 4, 3]), [1, 2, 1, 2]])
    assert drafts == [[4, 3], [1, 2]]
    assert isinstance(proposer, Proposer) and proposer.num_speculative_tokens == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2, "method": "eagle"}, "method"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig(**kwargs)


def test_speculative_config_from_vllm_style_dicts() -> None:
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                       "prompt_lookup_min": 2})
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (4, 2, 4)
    draft = SpeculativeConfig.from_dict({"model": "/models/draft", "num_speculative_tokens": 3})
    assert draft.method == "draft_model"
    draft.check_implemented()  # both methods run (tests/spec_decode/test_draft_model.py)
    for bad, words in (({"num_speculative_tokens": 2, "k": 1}, "unknown keys"), ({}, "is required"),
                       ({"num_speculative_tokens": "4"}, "must be an integer"),
                       ({"num_speculative_tokens": True}, "must be an integer"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "needs method"),
                       ([("num_speculative_tokens", 2)], "JSON object")):
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.from_dict(bad)


def test_engine_args_refuse_a_bad_or_unimplemented_speculative_config() -> None:
    from pagedllm.config import EngineArgs

    args = EngineArgs(speculative_config={"num_speculative_tokens": 3})
    assert args.scheduler_config(512).num_speculative_tokens == 3
    assert EngineArgs().scheduler_config(512).num_speculative_tokens == 0
    assert EngineArgs(speculative_config={"model": "x", "num_speculative_tokens": 3}).speculative_config.model == "x"
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        EngineArgs(speculative_config={"num_speculative_tokens": 0})

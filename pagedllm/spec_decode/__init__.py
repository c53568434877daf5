"""Speculative decoding: proposers of draft tokens (the verifying side is the speculative-decoding issue).

    SpeculativeConfig   method and number of draft tokens per step (config.py)
    Proposer            token ids so far -> up to k draft tokens per request (proposer.py)
    NgramProposer       prompt lookup: continue the latest n-gram from an earlier match (ngram.py)

Proposers are plain Python/numpy on token ids; they know nothing of the
scheduler or the model runner, which feed them and verify their drafts.
"""

from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram import NgramProposer
from pagedllm.spec_decode.proposer import Proposer

__all__ = ["NgramProposer", "Proposer", "SpeculativeConfig"]

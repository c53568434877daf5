"""N-gram (prompt lookup) proposer: no draft model, only the request's own tokens.

Text often repeats itself (code, quotes of the prompt, lists). If the last n
tokens also occur earlier, the tokens that followed them there are a cheap
guess for what comes next:

    tokens:  a b c d x y a b c  ->  suffix "a b c" (n = 3) matched at 0 -> draft "d x y"

The longest n in [prompt_lookup_max .. prompt_lookup_min] with a match wins;
among its matches the earliest, as vLLM's prompt lookup does (its continuation
is the longest available). The match is found with a numpy sliding window, so
the cost is one vectorised compare per n over the request's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedllm.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    """Drafts the continuation of the latest n-gram's earliest earlier occurrence."""

    def propose(self, requests: Sequence[Sequence[int]]) -> list[list[int]]:
        return [self.propose_one(np.asarray(token_ids, dtype=np.int64)) for token_ids in requests]

    def propose_one(self, tokens: np.ndarray) -> list[int]:
        """Draft tokens (at most num_speculative_tokens) for one request's ``tokens`` (L,)."""
        num_tokens = tokens.shape[0]
        lo, hi = self.config.prompt_lookup_min, min(self.config.prompt_lookup_max, num_tokens - 1)
        for n in range(hi, lo - 1, -1):
            suffix = tokens[num_tokens - n :]
            # Windows start at 0 .. L-1-n: each ends before the last token, so it has a next
            # token to propose and is never the suffix itself.
            windows = sliding_window_view(tokens[: num_tokens - 1], n)  # (L - n, n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start : start + self.num_speculative_tokens].tolist()
        return []

"""The proposer interface: what a draft-token source gives the engine each step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pagedllm.spec_decode.config import SpeculativeConfig


class Proposer(ABC):
    """Drafts up to ``num_speculative_tokens`` next tokens for each request.

    A draft may be shorter, or empty, when the proposer has nothing to offer;
    the verifier then scores fewer tokens for that request.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens

    @abstractmethod
    def propose(self, requests: Sequence[Sequence[int]]) -> list[list[int]]:
        """``requests``: each request's token ids so far (prompt then output) -> its draft tokens."""


"""SpeculativeConfig: which proposer drafts tokens and how many per request per step."""

from __future__ import annotations

from dataclasses import dataclass

SPECULATIVE_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_speculative_tokens`` drafts per request per step from ``method``.

    n-gram: the last n tokens (n from ``prompt_lookup_max`` down to
    ``prompt_lookup_min``) are looked up earlier in the request's tokens.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"method must be one of {list(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= prompt_lookup_min "
                             f"({self.prompt_lookup_min})")

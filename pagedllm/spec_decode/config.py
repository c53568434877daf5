"""SpeculativeConfig: which proposer drafts tokens and how many per request per step."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SPECULATIVE_METHODS = ("ngram", "draft_model")
IMPLEMENTED_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_speculative_tokens`` drafts per request per step from ``method``.

    n-gram: the last n tokens (n from ``prompt_lookup_max`` down to
    ``prompt_lookup_min``) are looked up earlier in the request's tokens.
    draft_model: ``model`` (same vocabulary as the target) drafts autoregressively.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model (method "draft_model")

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"speculative_config: {name} must be an integer, got {value!r}")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"method must be one of {list(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= prompt_lookup_min "
                             f"({self.prompt_lookup_min})")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config: a draft model needs method 'draft_model' and a 'model' path; "
                             "n-gram speculation takes no model")

    def check_implemented(self) -> None:
        """ValueError for a method the engine cannot run yet (checked before any model is loaded)."""
        if self.method not in IMPLEMENTED_METHODS:
            raise ValueError(f"speculative method {self.method!r} is not implemented yet; "
                             f"use one of {list(IMPLEMENTED_METHODS)}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SpeculativeConfig:
        """Build from vLLM-style keys, e.g. ``{"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 2}`` or ``{"model": PATH, "num_speculative_tokens": 3}``.
        Unknown keys and wrong types are a ValueError."""
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a JSON object / dict, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        config = dict(config)
        if config.get("model") is not None and "method" not in config:
            config["method"] = "draft_model"
        return cls(**config)

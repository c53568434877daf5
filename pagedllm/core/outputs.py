"""Messages between the scheduler and the model runner (plain dataclasses, no torch).

The scheduler sends a diff: full data the first time a request is scheduled
(NewRequestData), then only what changed (CachedRequestData). The runner keeps
its own per-request state, so a decode step ships a few integers per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.lora.request import LoRARequest


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Tokens already generated: non-empty when a request is first sent to a
    # runner after being preempted and recomputed elsewhere.
    output_token_ids: list[int] = field(default_factory=list)
    lora_request: LoRARequest | None = None  # the adapter it runs with; None: the base model


@dataclass
class CachedRequestData:
    req_id: str
    resumed_from_preemption: bool
    new_block_ids: list[int]  # appended to the table; the whole table when resumed
    num_computed_tokens: int
    # --- speculative decoding ---
    # >= 0: first cut the table to this many blocks (lookahead blocks given back after rejections).
    num_kept_blocks: int = -1
    # --- end speculative decoding ---


# --- structured outputs ---
@dataclass
class GrammarBitmask:
    """The allowed next tokens of the constrained sequences that sample this step (pagedllm/structured_output)."""

    req_ids: list[str]  # bitmask row i belongs to req_ids[i]
    bitmask: object  # (len(req_ids), ceil(vocab_size / 32)) int32 numpy array; bit j of a row: token j allowed
# --- end structured outputs ---


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # runner may drop these requests' state
    preempted_req_ids: set[str] = field(default_factory=set)
    # KV block copies to make before this step's forward (copy-on-write of forked requests).
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Swap preemption, done before the copies: (gpu, cpu) pairs out, then (cpu, gpu) pairs in.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    grammar_bitmask: GrammarBitmask | None = None  # structured outputs: set by the engine after schedule()
    # --- speculative decoding ---
    # req_id -> draft tokens verified after its last token this step (counted in num_scheduled_tokens).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # --- end speculative decoding ---

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner to do. Finished and preempted ids are work: the scheduler sends
        them once, and a runner never told keeps a stale row under an id that may come back."""
        return (self.total_num_scheduled_tokens == 0 and not self.blocks_to_copy
                and not self.blocks_to_swap_out and not self.blocks_to_swap_in
                and not self.finished_req_ids and not self.preempted_req_ids)


@dataclass
class LogprobsLists:
    """Per sampled token: [sampled id, top-1 .. top-k ids], their logprobs, and the sampled token's rank."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # Per request, in req_ids order: the tokens sampled this step (empty while a
    # prompt is still being prefilled in chunks).
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Per request, for the prompt positions computed this step (prompt_logprobs).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # --- speculative decoding ---
    # req_id -> the proposer's drafts for the request's next step (only with speculation on).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # --- end speculative decoding ---


@dataclass
class RequestUpdate:
    """What one step did to one request, for the engine to turn into user output."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    # Set when the request finished this step: "stop" | "length" | "abort".
    finish_reason: str | None = None
    # The stop token id that ended it (a stop string is found by the engine, not here).
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache at first admission (0 until admitted).
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler and its KV cache, for metrics (counters are cumulative)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks held by requests
    num_preemptions: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int
    num_free_blocks: int
    num_total_blocks: int
    spec_decoding: SpecDecodingStats | None = None  # None: speculation off
    # --- lora: adapter names of the running and waiting requests (pagedllm:lora_requests_info) ---
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)


@dataclass
class SpecDecodingStats:
    """Cumulative speculative-decoding counters (vLLM's names): a draft is one request's drafts in one step."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # [i]: how many drafts had their token at position i accepted (acceptance by position).
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_draft_tokens:
            per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified draft: accepted ones plus the one sampled after them."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.num_accepted_tokens_per_pos))

"""Request: one prompt's state as the scheduler sees it (token ids and progress, no text, no torch).

Every request just moves ``num_computed_tokens`` toward ``num_tokens``; there is no
separate prefill phase. A prefill is the stretch where ``num_computed_tokens`` is
below the prompt length, a decode is one new token per step.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.lora.request import LoRARequest


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, nothing computed (new, or a fork whose blocks were taken back)
    FORKED = 1  # queued, its first tokens' KV already in GPU blocks shared with its source
    SWAPPED = 2  # queued after preemption, its computed KV on the CPU
    PREEMPTED = 3  # queued after preemption, to be recomputed
    RUNNING = 4
    PAUSED = 5  # holds its blocks but is not scheduled (a beam waiting for its group)
    # Everything from FINISHED_STOPPED on is finished.
    FINISHED_STOPPED = 6
    FINISHED_LENGTH_CAPPED = 7
    FINISHED_ABORTED = 8

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.lora_request = lora_request  # the adapter it runs with; None: the base model
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 until then
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.max_tokens = sampling_params.max_tokens
        # Beam search: after each sampled token the request is paused (not stopped) so
        # the engine can fork the winning beams from its KV blocks.
        self.pause_after_sample = False
        # Speculative decoding: the proposer's drafts for the next step (never part of all_token_ids).
        self.spec_token_ids: list[int] = []
        # Async scheduling: tokens that steps in flight will sample for this request, which
        # the host does not know yet (positions are scheduled as if they were; see the scheduler).
        self.num_output_placeholders = 0
        # Async scheduling: steps scheduled with this request whose output has not come back yet
        # (at most two: the one in flight and the one just scheduled).
        self.num_steps_in_flight = 0

    @property
    def lora_int_id(self) -> int:
        """The adapter's engine-wide id; 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")

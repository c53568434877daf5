"""Per-request state the model runner keeps between steps, and the flat batch built from it.

The scheduler sends only diffs (see core/outputs.py); the runner remembers each
request's tokens, block table, sampling params and RNG here. Each step flattens the
scheduled requests into the ragged batch the model consumes:

    input_ids / positions / slot_mapping : (num_tokens,)
    query_start_loc                      : (num_reqs + 1,)
    seq_lens                             : (num_reqs,)
    block_tables                         : (num_reqs, max_num_blocks)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.core.outputs import SchedulerOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]


@dataclass
class FlatBatch:
    """One step's scheduled requests flattened into host arrays (numpy, int64/int32)."""

    req_ids: list[str]
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    logits_indices: list[int]  # flat token index of each sampling request's last token
    sample_req_ids: list[str]  # requests that sample this step, in logits_indices order
    max_query_len: int
    max_seq_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def update_states(states: dict[str, CachedRequestState], sched: SchedulerOutput, device: torch.device) -> None:
    """Apply the scheduler's diff to the runner's per-request states."""
    for req_id in sched.finished_req_ids:
        states.pop(req_id, None)
    for new in sched.scheduled_new_reqs:
        gen = None
        if new.sampling_params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(new.sampling_params.seed)
        states[new.req_id] = CachedRequestState(
            new.req_id, new.prompt_token_ids, new.sampling_params, list(new.block_ids),
            new.num_computed_tokens, list(new.output_token_ids), gen)
    for cached in sched.scheduled_cached_reqs:
        state = states[cached.req_id]
        if cached.resumed_from_preemption:
            state.block_ids = list(cached.new_block_ids)
        else:
            state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens


def build_flat_batch(states: dict[str, CachedRequestState], sched: SchedulerOutput, block_size: int) -> FlatBatch:
    req_ids = list(sched.num_scheduled_tokens)
    num_reqs = len(req_ids)
    counts = np.fromiter((sched.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64, count=num_reqs)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    max_blocks = max(len(states[r].block_ids) for r in req_ids)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    starts = np.empty(num_reqs, dtype=np.int64)
    input_ids: list[int] = []
    logits_indices, sample_req_ids = [], []
    for i, req_id in enumerate(req_ids):
        st = states[req_id]
        block_tables[i, :len(st.block_ids)] = st.block_ids
        start, end = st.num_computed_tokens, st.num_computed_tokens + int(counts[i])
        starts[i] = start
        input_ids.extend(st.token_slice(start, end))
        if end == st.num_tokens:  # the chunk reaches the last known token: sample
            logits_indices.append(int(query_start_loc[i + 1]) - 1)
            sample_req_ids.append(req_id)
    # positions: for each request, start .. start + count - 1, laid end to end.
    req_of_token = np.repeat(np.arange(num_reqs), counts)
    positions = starts[req_of_token] + (np.arange(len(req_of_token)) - query_start_loc[:-1][req_of_token])
    block_idx = block_tables[req_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_idx * block_size + positions % block_size
    seq_lens = (starts + counts).astype(np.int32)
    return FlatBatch(
        req_ids=req_ids, input_ids=np.asarray(input_ids, dtype=np.int64), positions=positions.astype(np.int64),
        slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
        logits_indices=logits_indices, sample_req_ids=sample_req_ids,
        max_query_len=int(counts.max()), max_seq_len=int(seq_lens.max()),
    )

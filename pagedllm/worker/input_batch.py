"""The persistent input batch: the runner's per-request state as rows of numpy arrays.

The scheduler sends diffs (see core/outputs.py). ``InputBatch.update_states`` applies
them to rows that persist between steps: a request gets a row when it is new or
resumed, its block table row grows when the scheduler appends blocks, it gives its
row back when it finishes or is preempted, and the rows behind are moved up so the
occupied rows stay ``[0, num_reqs)``:

    token_ids      (R, max_model_len) int32   prompt then output tokens
    block_table    (R, max_num_blocks) int32  block ids, num_blocks[r] of them valid
    num_tokens / num_prompt_tokens / num_computed_tokens / num_blocks  (R,)
    sampling       SamplingState: temperature, filters, penalties, generator ... per row

``InputBatch.prepare`` then builds one step's flat batch by numpy indexing of those
rows, with no per-request Python beyond looking up each scheduled request's row:

    input_ids / positions / slot_mapping : (num_tokens,)
    query_start_loc                      : (num_reqs + 1,)
    seq_lens / num_sampled_tokens        : (num_reqs,)
    block_tables                         : (num_reqs, max blocks of those requests)
    logits_indices                       : (sum of num_sampled_tokens,), per request in order

A preempted request leaves the batch; its tokens and params wait in a
``CachedRequestState`` until it is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from pagedllm.lora.request import LoRARequest
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampling_metadata import SamplingMetadata, SamplingState

# The most new tokens per request of a step that counts as decoding (FlatBatch.decoding).
DECODE_MAX_QUERY = 16

@dataclass
class CachedRequestState:
    """A request the runner knows but that holds no row (preempted): what re-adding it needs."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_token_ids: list[int]
    generator: torch.Generator | None
    lora_request: LoRARequest | None = None


@dataclass
class FlatBatch:
    """One step's scheduled requests flattened into host arrays (numpy)."""

    req_ids: list[str]
    rows: np.ndarray  # (num_reqs,) int64: each request's row in the InputBatch
    input_ids: np.ndarray  # (num_tokens,) int64
    positions: np.ndarray  # (num_tokens,) int64
    slot_mapping: np.ndarray  # (num_tokens,) int64
    query_start_loc: np.ndarray  # (num_reqs + 1,) int32
    seq_lens: np.ndarray  # (num_reqs,) int32
    block_tables: np.ndarray  # (num_reqs, width) int32
    num_sampled_tokens: np.ndarray  # (num_reqs,) int64: tokens each request samples this step
    logits_indices: np.ndarray  # (sum num_sampled_tokens,) int64: flat token index of each sampled position
    max_query_len: int
    max_seq_len: int
    # Every request samples exactly one token (every decode step): the per-request bookkeeping
    # of the sampled tokens takes its short path.
    one_sample_each: bool = False
    # Every request's new tokens are past its prompt and at most DECODE_MAX_QUERY (decodes, speculative
    # verification): no prompt chunk, no recomputation of a preempted request's outputs.
    decoding: bool = False
    # Speculative decoding: per sampled position (logits_indices order), the draft it verifies,
    # -1 on each request's last position (its bonus token); None when no request has drafts.
    draft_ids: np.ndarray | None = None
    # Async scheduling: (flat token indices, input ids on the device) that replace input_ids there,
    # the tokens the previous step sampled and the host has not read yet (worker/async_output.py).
    input_id_patch: tuple[torch.Tensor, torch.Tensor] | None = None
    # LoRA on a GPU: the SGMV plan (token permutation, blocks) of the step's adapter tokens
    # (lora/triton_punica.py); None when no token has an adapter.
    lora_plan: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


class InputBatch:
    """Rows of per-request state, updated from the scheduler's diffs (see the module docstring).

    ``capacity`` rows to start with; the arrays double when more requests hold rows at
    once (paused beams keep theirs while not scheduled, so that can exceed max_num_seqs).
    """

    def __init__(self, capacity: int, max_model_len: int, max_num_blocks: int, vocab_size: int,
                 device: torch.device) -> None:
        self.device = device
        self.req_ids: list[str | None] = [None] * capacity
        self.req_id_to_row: dict[str, int] = {}
        self.token_ids = np.zeros((capacity, max_model_len), dtype=np.int32)
        self.num_prompt_tokens = np.zeros(capacity, dtype=np.int32)
        self.num_tokens = np.zeros(capacity, dtype=np.int32)
        self.num_computed_tokens = np.zeros(capacity, dtype=np.int32)
        self.block_table = np.zeros((capacity, max_num_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int32)
        self.lora_ids = np.zeros(capacity, dtype=np.int32)  # each row's adapter id, 0: the base model
        self.lora_requests: dict[int, LoRARequest] = {}  # adapter id -> request naming its path
        self.sampling = SamplingState(capacity, vocab_size)
        self.preempted: dict[str, CachedRequestState] = {}
        self._condensed = True

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_row)

    # ---- the scheduler's diff ----------------------------------------------
    def update_states(self, sched: SchedulerOutput) -> None:
        """Apply one step's diff: removals, then new and resumed requests, then condense."""
        for req_id in sched.finished_req_ids:
            self.preempted.pop(req_id, None)
            if req_id in self.req_id_to_row:
                self.remove_request(req_id)
        for req_id in sched.preempted_req_ids:
            if req_id in self.req_id_to_row:
                self.preempted[req_id] = self._cached_state(req_id)
                self.remove_request(req_id)
        for new in sched.scheduled_new_reqs:
            self.add_request(new)
        for cached in sched.scheduled_cached_reqs:
            self._update_cached(cached)
        self.condense()

    def _update_cached(self, cached: CachedRequestData) -> None:
        if cached.resumed_from_preemption:
            state = self.preempted.pop(cached.req_id, None)
            if state is not None:  # preempted: back into a row (a released paused beam kept its row)
                self.add_request(NewRequestData(
                    state.req_id, state.prompt_token_ids, state.sampling_params, [], 0, state.output_token_ids,
                    state.lora_request), state.generator)
            row = self.req_id_to_row[cached.req_id]
            self.num_blocks[row] = 0  # the whole table is sent again
        else:
            row = self.req_id_to_row[cached.req_id]
            if cached.num_kept_blocks >= 0:  # speculative decoding gave lookahead blocks back
                self.num_blocks[row] = min(int(self.num_blocks[row]), cached.num_kept_blocks)
        if cached.new_block_ids:
            self._append_blocks(row, cached.new_block_ids)
        self.num_computed_tokens[row] = cached.num_computed_tokens

    def add_request(self, new: NewRequestData, generator: torch.Generator | None = None) -> int:
        """Give ``new`` the first free row; return it. A seeded request gets its generator here."""
        row = self._free_row()
        params = new.sampling_params
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # seed + sample index may pass 2**63
        num_prompt, num_output = len(new.prompt_token_ids), len(new.output_token_ids)
        self.req_ids[row] = new.req_id
        self.req_id_to_row[new.req_id] = row
        self.token_ids[row, :num_prompt] = new.prompt_token_ids
        self.token_ids[row, num_prompt:num_prompt + num_output] = new.output_token_ids
        self.num_prompt_tokens[row] = num_prompt
        self.num_tokens[row] = num_prompt + num_output
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.lora_ids[row] = new.lora_request.lora_int_id if new.lora_request is not None else 0
        if new.lora_request is not None:
            self.lora_requests[new.lora_request.lora_int_id] = new.lora_request
        self._append_blocks(row, new.block_ids)
        self.sampling.add(row, params, generator)
        return row

    def remove_request(self, req_id: str) -> None:
        """Free ``req_id``'s row (a hole until ``condense``)."""
        row = self.req_id_to_row.pop(req_id)
        self.req_ids[row] = None
        self._condensed = False
        self.sampling.remove(row)

    def _cached_state(self, req_id: str) -> CachedRequestState:
        """What re-adding ``req_id`` after it leaves its row will need."""
        row = self.req_id_to_row[req_id]
        num_prompt, num_tokens = int(self.num_prompt_tokens[row]), int(self.num_tokens[row])
        return CachedRequestState(
            req_id, self.token_ids[row, :num_prompt].tolist(), self.sampling.params[row],
            self.token_ids[row, num_prompt:num_tokens].tolist(), self.sampling.generators.get(row),
            self.lora_requests.get(int(self.lora_ids[row])))

    def condense(self) -> None:
        """Move the last occupied rows into the holes, so the occupied rows are ``[0, num_reqs)``."""
        if self._condensed:  # no row was freed since the last call: nothing to scan
            return
        self._condensed = True
        n = self.num_reqs
        holes = [row for row in range(n) if self.req_ids[row] is None]
        movers = [row for row in range(len(self.req_ids) - 1, n - 1, -1) if self.req_ids[row] is not None]
        for dst, src in zip(holes, movers):
            req_id = self.req_ids[src]
            self.req_ids[dst], self.req_ids[src] = req_id, None
            self.req_id_to_row[req_id] = dst
            num_tokens, num_blocks = self.num_tokens[src], self.num_blocks[src]
            self.token_ids[dst, :num_tokens] = self.token_ids[src, :num_tokens]
            self.block_table[dst, :num_blocks] = self.block_table[src, :num_blocks]
            for arr in (self.num_prompt_tokens, self.num_tokens, self.num_computed_tokens, self.num_blocks,
                        self.lora_ids):
                arr[dst] = arr[src]
            self.sampling.move(src, dst)

    def _free_row(self) -> int:
        n = self.num_reqs
        if n == len(self.req_ids):
            self._grow(max(2 * n, 1))
            return n
        if self._condensed:  # the first free row is right after the occupied ones
            return n
        return self.req_ids.index(None)

    def _grow(self, capacity: int) -> None:
        old = len(self.req_ids)
        self.req_ids.extend([None] * (capacity - old))
        for name in ("token_ids", "num_prompt_tokens", "num_tokens", "num_computed_tokens", "block_table",
                     "num_blocks", "lora_ids"):
            arr = getattr(self, name)
            grown = np.zeros((capacity, *arr.shape[1:]), dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        self.sampling.grow(capacity)

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        self.block_table[row, start:end] = block_ids
        self.num_blocks[row] = end

    # ---- one step ------------------------------------------------------------
    def prepare(self, num_scheduled_tokens: dict[str, int], block_size: int,
                spec_tokens: dict[str, list[int]] | None = None) -> FlatBatch:
        """Flatten the scheduled requests (in the scheduler's order) into one step's batch.

        ``spec_tokens``: each speculating request's drafts, verified after its last token."""
        req_ids = list(num_scheduled_tokens)
        n = len(req_ids)
        rows = np.fromiter(map(self.req_id_to_row.__getitem__, req_ids), dtype=np.int64, count=n)
        counts = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=n)
        if spec_tokens:
            return self._prepare_spec(req_ids, rows, counts, block_size, spec_tokens)
        return self._flatten(req_ids, rows, counts, block_size)

    def _flatten(self, req_ids: list[str], rows: np.ndarray, counts: np.ndarray, block_size: int,
                 num_drafts: np.ndarray | None = None) -> FlatBatch:
        n = len(req_ids)
        starts = self.num_computed_tokens[rows].astype(np.int64)
        query_start_loc = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        if num_tokens == n:  # decode only: one token per request
            positions, token_rows = starts, rows
        else:  # positions: for each request, start .. start + count - 1, laid end to end
            req_of_token = np.repeat(np.arange(n), counts)
            positions = starts[req_of_token] + (np.arange(num_tokens) - query_start_loc[:-1][req_of_token])
            token_rows = rows[req_of_token]
        block_idx = self.block_table[token_rows, positions // block_size].astype(np.int64)
        seq_lens = (starts + counts).astype(np.int32)
        # A request samples when its chunk reaches its last known token: one token, or with
        # k drafts after it, k + 1 (each draft's position and the one after the last).
        known = self.num_tokens[rows] if num_drafts is None else self.num_tokens[rows] + num_drafts
        if (seq_lens > known).any():  # the scheduler counts tokens (or async placeholders) this row lacks
            i = int(np.argmax(seq_lens > known))
            raise RuntimeError(f"internal error: {req_ids[i]!r} is scheduled up to position {seq_lens[i]} but "
                               f"its runner row holds {known[i]} tokens")
        if num_drafts is None:
            num_sampled = (seq_lens == known).astype(np.int64)
        else:
            num_sampled = np.where(seq_lens == known, num_drafts + 1, 0)
        one_each = bool((num_sampled == 1).all())
        logits_indices = (query_start_loc[1:] - 1).astype(np.int64) if one_each else \
            flat_logits_indices(query_start_loc, num_sampled)
        return FlatBatch(
            req_ids=req_ids, rows=rows, input_ids=self.token_ids[token_rows, positions].astype(np.int64),
            positions=positions, slot_mapping=block_idx * block_size + positions % block_size,
            query_start_loc=query_start_loc, seq_lens=seq_lens,
            block_tables=self.block_table[rows, :int(self.num_blocks[rows].max())],
            num_sampled_tokens=num_sampled, logits_indices=logits_indices,
            max_query_len=int(counts.max()), max_seq_len=int(seq_lens.max()), one_sample_each=one_each,
            decoding=int(counts.max()) <= DECODE_MAX_QUERY and bool((starts >= self.num_prompt_tokens[rows]).all()))

    def _prepare_spec(self, req_ids: list[str], rows: np.ndarray, counts: np.ndarray, block_size: int,
                      spec_tokens: dict[str, list[int]]) -> FlatBatch:
        """``prepare`` with drafts: each is written after its request's tokens (not counted in
        num_tokens), so it is gathered as an input token; a request with k drafts samples at
        its last k + 1 positions."""
        num_drafts = np.zeros(len(req_ids), dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            drafts = spec_tokens.get(req_id)
            if drafts:
                row, end = rows[i], self.num_tokens[rows[i]]
                self.token_ids[row, end:end + len(drafts)] = drafts
                num_drafts[i] = len(drafts)
        batch = self._flatten(req_ids, rows, counts, block_size, num_drafts)
        draft_ids = np.full(len(batch.logits_indices), -1, dtype=np.int64)
        first = np.cumsum(batch.num_sampled_tokens) - batch.num_sampled_tokens
        for i in np.flatnonzero(num_drafts).tolist():
            k, row = int(num_drafts[i]), rows[i]
            draft_ids[first[i]:first[i] + k] = self.token_ids[row, self.num_tokens[row]:self.num_tokens[row] + k]
        batch.draft_ids = draft_ids
        return batch

    def sampling_metadata(self, batch: FlatBatch) -> SamplingMetadata:
        """The sampling tensors of ``batch``'s sampled positions, in ``logits_indices`` order."""
        rows = np.repeat(batch.rows, batch.num_sampled_tokens)
        drafts_before = None
        if batch.draft_ids is not None:  # a request's i-th sampled position follows i drafts
            first = np.cumsum(batch.num_sampled_tokens) - batch.num_sampled_tokens
            drafts_before = np.arange(len(rows)) - np.repeat(first, batch.num_sampled_tokens)
        return self.sampling.metadata(rows, self.token_ids, self.num_prompt_tokens, self.num_tokens, self.device,
                                      drafts_before)

    def append_token_lists(self, rows: np.ndarray, token_lists: list[list[int]]) -> None:
        """Append each row's verified tokens (accepted drafts and the sampled one) to it."""
        for row, tokens in zip(rows.tolist(), token_lists):
            end = int(self.num_tokens[row])
            self.token_ids[row, end:end + len(tokens)] = tokens
            self.num_tokens[row] = end + len(tokens)

    def append_tokens_of(self, tokens: dict[str, list[int]]) -> None:
        """Append tokens sampled elsewhere (by a pipeline's last stage) to the requests here: to their rows,
        or to what a request preempted since its step keeps for its return."""
        for req_id, toks in tokens.items():
            if req_id in self.preempted:
                self.preempted[req_id].output_token_ids.extend(toks)
        known = [(self.req_id_to_row[r], t) for r, t in tokens.items() if t and r in self.req_id_to_row]
        if known:
            self.append_token_lists(np.array([row for row, _ in known]), [t for _, t in known])

    def append_sampled(self, batch: FlatBatch, sampled: np.ndarray) -> None:
        """Append the tokens sampled for ``batch`` (in ``logits_indices`` order) to their rows."""
        counts = batch.num_sampled_tokens
        if batch.one_sample_each:
            self.token_ids[batch.rows, self.num_tokens[batch.rows]] = sampled
            self.num_tokens[batch.rows] += 1
            return
        rows = np.repeat(batch.rows, counts)
        # Each request's k-th sampled token lands k places after its current end.
        first = np.cumsum(counts) - counts
        offsets = np.arange(len(rows)) - np.repeat(first, counts)
        self.token_ids[rows, self.num_tokens[rows] + offsets] = sampled
        self.num_tokens[batch.rows] += counts.astype(np.int32)


def flat_logits_indices(query_start_loc: np.ndarray, num_sampled_tokens: np.ndarray) -> np.ndarray:
    """Flat token indices of the sampled positions: each request's last ``num_sampled_tokens``
    query tokens, request by request. (sum num_sampled_tokens,) int64."""
    ends = query_start_loc[1:].astype(np.int64)
    if num_sampled_tokens.max(initial=0) <= 1:  # today's case: at most one token per request
        return ends[num_sampled_tokens > 0] - 1
    first = np.cumsum(num_sampled_tokens) - num_sampled_tokens
    offsets = np.arange(int(num_sampled_tokens.sum())) - np.repeat(first, num_sampled_tokens)
    return np.repeat(ends - num_sampled_tokens, num_sampled_tokens) + offsets

"""Per-request state the model runner keeps between steps, and the flat batch built from it.

The scheduler sends only diffs (see core/outputs.py); the runner remembers each
request's tokens, block table, sampling params and RNG here. Each step flattens the
scheduled requests into the ragged batch the model consumes:

    input_ids / positions / slot_mapping : (num_tokens,)
    query_start_loc                      : (num_reqs + 1,)
    seq_lens                             : (num_reqs,)
    block_tables                         : (num_reqs, max_num_blocks)

``InputBuffers`` holds those arrays' persistent device tensors (fixed addresses, so a
CUDA graph can read them) and the pinned host staging they are copied from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata
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
    # block_ids mirrored as int32 with spare capacity (zeros past the end), so a step copies
    # a numpy row instead of converting a Python list; kept in sync by set/append_block_ids.
    block_table: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.set_block_ids(self.block_ids)

    def set_block_ids(self, block_ids: list[int]) -> None:
        self.block_ids = list(block_ids)
        self.block_table = np.zeros(max(16, 2 * len(block_ids)), dtype=np.int32)
        self.block_table[:len(block_ids)] = block_ids

    def append_block_ids(self, new_ids: list[int]) -> None:
        n = len(self.block_ids)
        self.block_ids.extend(new_ids)
        if len(self.block_ids) > len(self.block_table):
            grown = np.zeros(2 * len(self.block_ids), dtype=np.int32)
            grown[:n] = self.block_table[:n]
            self.block_table = grown
        self.block_table[n:len(self.block_ids)] = new_ids

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
            gen.manual_seed(new.sampling_params.seed & 0xFFFF_FFFF_FFFF_FFFF)  # seed + sample index may pass 2**63
        states[new.req_id] = CachedRequestState(
            new.req_id, new.prompt_token_ids, new.sampling_params, list(new.block_ids),
            new.num_computed_tokens, list(new.output_token_ids), gen)
    for cached in sched.scheduled_cached_reqs:
        state = states[cached.req_id]
        if cached.resumed_from_preemption:
            state.set_block_ids(cached.new_block_ids)
        elif cached.new_block_ids:
            state.append_block_ids(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens


def build_flat_batch(states: dict[str, CachedRequestState], sched: SchedulerOutput, block_size: int) -> FlatBatch:
    # One pass in Python per request (a decode step runs this for every running request, and the
    # GPU waits for it), then numpy for everything per token.
    req_ids = list(sched.num_scheduled_tokens)
    counts_list = list(sched.num_scheduled_tokens.values())
    sts = [states[r] for r in req_ids]
    num_reqs = len(sts)
    num_blocks = [len(st.block_ids) for st in sts]
    block_tables = np.zeros((num_reqs, max(num_blocks)), dtype=np.int32)
    starts_list: list[int] = []
    input_ids: list[int] = []
    logits_indices, sample_req_ids = [], []
    num_tokens = 0
    for i, st in enumerate(sts):
        block_tables[i, :num_blocks[i]] = st.block_table[:num_blocks[i]]
        start, count = st.num_computed_tokens, counts_list[i]
        starts_list.append(start)
        num_tokens += count
        p = len(st.prompt_token_ids)
        if count == 1:  # decode (or a one-token chunk): no slice
            input_ids.append(st.prompt_token_ids[start] if start < p else st.output_token_ids[start - p])
        else:
            input_ids.extend(st.token_slice(start, start + count))
        if start + count == p + len(st.output_token_ids):  # the chunk reaches the last known token: sample
            logits_indices.append(num_tokens - 1)
            sample_req_ids.append(req_ids[i])
    counts = np.array(counts_list, dtype=np.int64)
    starts = np.array(starts_list, dtype=np.int64)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    if num_tokens == num_reqs:  # decode only: one token per request
        positions = starts
        block_idx = block_tables[np.arange(num_reqs), positions // block_size].astype(np.int64)
    else:  # positions: for each request, start .. start + count - 1, laid end to end
        req_of_token = np.repeat(np.arange(num_reqs), counts)
        positions = starts[req_of_token] + (np.arange(num_tokens) - query_start_loc[:-1][req_of_token])
        block_idx = block_tables[req_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_idx * block_size + positions % block_size
    seq_lens = (starts + counts).astype(np.int32)
    return FlatBatch(
        req_ids=req_ids, input_ids=np.array(input_ids, dtype=np.int64), positions=positions,
        slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
        logits_indices=logits_indices, sample_req_ids=sample_req_ids,
        max_query_len=max(counts_list), max_seq_len=int(seq_lens.max()),
    )


class InputBuffers:
    """Persistent device tensors for one step's inputs, filled from pinned host memory.

    Two staging arrays, each copied with one non-blocking copy per step (the used prefix):

        int64: [ input_ids (T) | positions (T) | slot_mapping (T) | logits_indices (S) ]
        int32: [ seq_lens (S) | query_start_loc (S + 1) | block_tables (rows x width) ]

    T = max tokens per step, S = max sequences per step. Each field sits at a fixed
    offset, so the device views a CUDA graph captured stay valid for every later step.
    On the CPU the staging arrays are the tensors the model reads (no copy).
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_num_blocks: int, device: torch.device) -> None:
        # Capacities rounded up to 16 elements, so every field starts 16-byte aligned (Triton
        # specialises kernels on pointer alignment).
        t, s = _round16(max_num_tokens), _round16(max_num_seqs)
        self.max_num_tokens, self.max_num_seqs, self.max_num_blocks = t, max_num_seqs, max_num_blocks
        self.device = device
        self._o_qsl, self._o_bt = s, s + _round16(s + 1)
        on_gpu = device.type == "cuda"
        self.host_i64 = torch.zeros(3 * t + s, dtype=torch.int64, pin_memory=on_gpu)
        self.host_i32 = torch.zeros(self._o_bt + s * max_num_blocks, dtype=torch.int32, pin_memory=on_gpu)
        self.h64, self.h32 = self.host_i64.numpy(), self.host_i32.numpy()
        self.h64[2 * t:3 * t] = -1  # padding tokens write nowhere
        self.dev_i64 = self.host_i64.to(device) if on_gpu else self.host_i64
        self.dev_i32 = self.host_i32.to(device) if on_gpu else self.host_i32
        # Recorded after each step's copies: the host waits on it before overwriting the staging.
        self._copied = torch.cuda.Event() if on_gpu else None

    def load(self, batch: FlatBatch, pad_to: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Copy ``batch`` to the device: (input_ids, positions, metadata, logits_indices).

        ``pad_to`` (a CUDA-graph batch size, decode only) pads to that many one-token rows
        that write nowhere (slot -1) and attend to nothing (seq_len 0); the block table then
        spans its full width, as the captured graph reads it."""
        n_tok, n_seq = batch.num_tokens, len(batch.req_ids)
        if n_tok > self.max_num_tokens or n_seq > self.max_num_seqs:
            raise ValueError(f"batch of {n_tok} tokens / {n_seq} sequences exceeds the input buffers "
                             f"({self.max_num_tokens} / {self.max_num_seqs})")
        rows = pad_to or n_seq
        n_pad_tok = n_tok + rows - n_seq
        width = self.max_num_blocks if pad_to else batch.block_tables.shape[1]
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        h64, h32 = self.h64, self.h32
        t = self.max_num_tokens
        h64[:n_tok] = batch.input_ids
        h64[t:t + n_tok] = batch.positions
        h64[2 * t:2 * t + n_tok] = batch.slot_mapping
        num_logits = len(batch.logits_indices)
        h64[3 * t:3 * t + num_logits] = batch.logits_indices
        h32[:n_seq] = batch.seq_lens
        qsl = h32[self._o_qsl:self._o_qsl + rows + 1]
        qsl[:n_seq + 1] = batch.query_start_loc
        bt = h32[self._o_bt:self._o_bt + rows * width].reshape(rows, width)
        bt[:n_seq, :batch.block_tables.shape[1]] = batch.block_tables
        if pad_to:
            h64[n_tok:n_pad_tok] = 0
            h64[t + n_tok:t + n_pad_tok] = 0
            h64[2 * t + n_tok:2 * t + n_pad_tok] = -1
            h32[n_seq:rows] = 0
            qsl[n_seq + 1:] = np.arange(n_tok + 1, n_pad_tok + 1, dtype=np.int32)
        if self._copied is not None:
            # The used prefix of each staging array, one copy each.
            end64, end32 = 3 * t + num_logits, self._o_bt + rows * width
            self.dev_i64[:end64].copy_(self.host_i64[:end64], non_blocking=True)
            self.dev_i32[:end32].copy_(self.host_i32[:end32], non_blocking=True)
            self._copied.record()
        md = self.metadata(rows, n_pad_tok, width, batch.max_query_len, batch.max_seq_len)
        md.num_actual_tokens = n_tok
        md.seq_lens_cpu = batch.seq_lens.tolist()
        md.query_start_loc_cpu = batch.query_start_loc.tolist()
        return (self.dev_i64[:n_pad_tok], self.dev_i64[t:t + n_pad_tok], md,
                self.dev_i64[3 * t:3 * t + num_logits])

    def fill_padding(self) -> None:
        """Set every device field to padding: token 0 at position 0, slot -1, seq_len 0, one query each."""
        t = self.max_num_tokens
        self.dev_i64.zero_()
        self.dev_i64[2 * t:3 * t].fill_(-1)
        self.dev_i32.zero_()
        n = self._o_bt - self._o_qsl
        self.dev_i32[self._o_qsl:self._o_bt].copy_(torch.arange(n, dtype=torch.int32))

    def metadata(self, rows: int, num_tokens: int, width: int, max_query_len: int,
                 max_seq_len: int) -> AttentionMetadata:
        """Attention metadata over views of the device buffers (what a CUDA graph captures)."""
        t, d32 = self.max_num_tokens, self.dev_i32
        return AttentionMetadata(
            slot_mapping=self.dev_i64[2 * t:2 * t + num_tokens], seq_lens=d32[:rows],
            query_start_loc=d32[self._o_qsl:self._o_qsl + rows + 1],
            block_tables=d32[self._o_bt:self._o_bt + rows * width].view(rows, width),
            max_query_len=max_query_len, max_seq_len=max_seq_len, num_actual_tokens=num_tokens)

    def token_views(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) device views of the first ``num_tokens`` tokens."""
        t = self.max_num_tokens
        return self.dev_i64[:num_tokens], self.dev_i64[t:t + num_tokens]


def _round16(n: int) -> int:
    return -(-n // 16) * 16

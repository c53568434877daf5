"""Async scheduling, the runner's side: a step whose sampled tokens stay on the device.

    step N   forward ─► sample (device) ─► non-blocking copy to pinned memory ─► event
             rows reserve a slot per sampled token (``InputBatch.num_tokens`` + 1, value unknown)
    step N+1 prepared on the host while N runs; its input id at each reserved position is
             gathered from N's sampled tensor on the device (``FeedPlan``), not from the host
    host     ``StepHandle.get()`` waits for N's event, writes the tokens into the reserved
             slots (or a preempted request's saved state) and returns N's ``ModelRunnerOutput``

The engine calls ``get()`` for step N after it has launched step N+1, so the GPU is never idle
while the host detokenizes, checks stops and schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.outputs import ModelRunnerOutput
from pagedllm.worker.input_batch import FlatBatch, InputBatch


class StepHandle:
    """A launched step; ``get()`` returns its output (waiting for the device if it must)."""

    def get(self) -> ModelRunnerOutput:
        raise NotImplementedError


class DoneStep(StepHandle):
    """A step whose output is already on the host (synchronous execution, or nothing sampled)."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def get(self) -> ModelRunnerOutput:
        return self.output


@dataclass
class PendingTokens:
    """The tokens a launched step samples: for each sampling request, its index in ``sampled``
    (the device tensor) and the position the token takes in the request's sequence."""

    sampled: torch.Tensor  # (num sampling requests,) int64 on the device
    index: dict[str, tuple[int, int]]  # req_id -> (index into sampled, position)

    def drop(self, req_ids: set[str]) -> None:
        """Forget finished requests' tokens: fed to no step and written to no row (the step's
        output still lists them; the scheduler drops them)."""
        for req_id in req_ids:
            self.index.pop(req_id, None)

    def feed(self, batch: FlatBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat token indices of ``batch``, their input ids on the device) for the batch's tokens
        at pending positions, or None when the batch has none."""
        dst, src = [], []
        qsl = batch.query_start_loc
        # Plain ints, one conversion per array: this runs every step on the host's critical path.
        firsts, ends, starts = qsl[:-1].tolist(), qsl[1:].tolist(), batch.positions[qsl[:-1]].tolist()
        index = self.index
        for req_id, first, end, start in zip(batch.req_ids, firsts, ends, starts):
            hit = index.get(req_id)
            if hit is None:
                continue
            k, pos = hit
            if start <= pos < start + end - first:
                dst.append(first + pos - start)
                src.append(k)
        if not dst:
            return None
        dst_t, src_t = (_to_device(np.asarray(a, dtype=np.int64), device) for a in (dst, src))
        return dst_t, self.sampled.index_select(0, src_t)


class DeferredStep(StepHandle):
    """A step whose sampled ids are still being copied to the host."""

    def __init__(self, input_batch: InputBatch, output: ModelRunnerOutput, pending: PendingTokens,
                 sampling_reqs: list[int], finish_logprobs) -> None:  # noqa: ANN001 (a bound method)
        self.input_batch = input_batch
        self.output = output
        self.pending = pending
        self.sampling_reqs = sampling_reqs
        self.finish_logprobs = finish_logprobs  # None, or (tokens-independent) logprobs to read after the sync
        sampled = pending.sampled
        if sampled.is_cuda:
            self.host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            self.host.copy_(sampled, non_blocking=True)
            self.ready: torch.cuda.Event | None = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = sampled, None

    def get(self) -> ModelRunnerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.host.tolist()
        self._fill_reserved_slots(tokens)
        out = self.output
        for i, token in zip(self.sampling_reqs, tokens):
            out.sampled_token_ids[i] = [token]
        if self.finish_logprobs is not None:
            self.finish_logprobs(out)
        return out

    def _fill_reserved_slots(self, tokens: list[int]) -> None:
        """Write each token where its row reserved a slot, or into the saved state of a request
        preempted since (a finished request has neither: its token is dropped)."""
        ib = self.input_batch
        for req_id, (k, pos) in self.pending.index.items():
            row = ib.req_id_to_row.get(req_id)
            if row is not None and pos < ib.num_tokens[row]:
                ib.token_ids[row, pos] = tokens[k]
                continue
            state = ib.preempted.get(req_id)
            if state is not None:
                j = pos - len(state.prompt_token_ids)
                if 0 <= j < len(state.output_token_ids):
                    state.output_token_ids[j] = tokens[k]


def reserve_slots(input_batch: InputBatch, batch: FlatBatch, sampled: torch.Tensor
                  ) -> tuple[PendingTokens, list[int]]:
    """Reserve one slot per sampling request (async steps sample one token each): its row's
    ``num_tokens`` grows now, the value arrives with ``DeferredStep.get``."""
    sampling_reqs = np.flatnonzero(batch.num_sampled_tokens).tolist()
    rows = batch.rows[sampling_reqs]
    positions = input_batch.num_tokens[rows].tolist()
    input_batch.num_tokens[rows] += 1
    index = {batch.req_ids[i]: (k, pos) for k, (i, pos) in enumerate(zip(sampling_reqs, positions))}
    return PendingTokens(sampled, index), sampling_reqs


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without a stream sync (through pinned memory on CUDA)."""
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t

"""The parallel state of this worker: its tensor- and pipeline-parallel ranks and their process groups.

Layers read it when they are built to decide which shard of each weight (and which layers) they own.
A single-process engine leaves it at rank 0 of 1 everywhere; a worker of a larger world calls
``init_parallel`` (or ``set_parallel_state`` in tests) before the model is built.

Ranks are laid out as vLLM lays them out: ``rank = pp_rank * tp_size + tp_rank``. The ranks of one
pipeline stage form a tensor-parallel group (their all-reduces and gathers); the ranks with the same
``tp_rank`` form a pipeline group (activations go from stage to stage inside it). Every collective names
its group: nothing goes through torch.distributed's default group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None  # torch.distributed.ProcessGroup of this stage's ranks (None: a world of one)
    pp_group: Any = None  # the ranks that share this tp_rank, one per stage

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_rank(self) -> int:  # the global rank this stage receives activations from
        return self.rank - self.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp_size


_state = ParallelState()


def set_parallel_state(state: ParallelState) -> None:
    global _state
    if not (0 <= state.tp_rank < state.tp_size and 0 <= state.pp_rank < state.pp_size):
        raise ValueError(f"parallel state out of range: {state}")
    _state = state


def set_tensor_parallel(rank: int, size: int) -> None:
    """Declare this worker's tensor-parallel rank and group size (no group: layer-shape tests only)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor_parallel: rank {rank} is not in [0, {size})")
    set_parallel_state(ParallelState(tp_rank=rank, tp_size=size))


def get_parallel_state() -> ParallelState:
    return _state


def get_tp_rank() -> int:
    return _state.tp_rank


def get_tp_size() -> int:
    return _state.tp_size


def init_parallel(tensor_parallel_size: int, pipeline_parallel_size: int, rank: int, init_method: str,
                  device: torch.device, timeout_s: float = 600.0) -> ParallelState:
    """Join the world (gloo on the CPU, NCCL on GPUs), build every tensor- and pipeline-parallel group
    (each rank creates all of them, in the same order, as torch.distributed requires) and make this
    rank's the current state."""
    world_size = tensor_parallel_size * pipeline_parallel_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    tp_rank, pp_rank = rank % tensor_parallel_size, rank // tensor_parallel_size
    tp_group = pp_group = None
    for stage in range(pipeline_parallel_size):
        group = dist.new_group([stage * tensor_parallel_size + t for t in range(tensor_parallel_size)])
        if stage == pp_rank:
            tp_group = group
    for t in range(tensor_parallel_size):
        group = dist.new_group([s * tensor_parallel_size + t for s in range(pipeline_parallel_size)])
        if t == tp_rank:
            pp_group = group
    state = ParallelState(tp_rank, tensor_parallel_size, pp_rank, pipeline_parallel_size, tp_group, pp_group)
    set_parallel_state(state)
    return state


def destroy_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator``, raising ValueError naming ``what`` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each tensor-parallel rank holds: its share, or one (replicated) when there are more
    ranks than KV heads (``tp_size`` must then be a multiple of ``num_kv_heads``)."""
    if tp_size > num_kv_heads:
        if tp_size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({tp_size}) must divide or be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        return 1
    return divide(num_kv_heads, tp_size, "num_key_value_heads")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (identity with one worker)."""
    if _state.tp_size > 1:
        dist.all_reduce(x, group=_state.tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each worker's ``x`` along the last dimension (identity with one worker)."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=-1)


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """The contiguous layers ``[start, end)`` of stage ``pp_rank``: as even as possible, earlier stages
    taking the remainder (vLLM's split)."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is larger than num_hidden_layers ({num_layers})")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def send_activations(tensors: tuple[torch.Tensor, ...]) -> None:
    """Send this stage's output (hidden, residual) to the next stage's rank of the same tp_rank."""
    for t in tensors:
        dist.send(t.contiguous(), dst=_state.next_rank, group=_state.pp_group)


def recv_activations(num_tokens: int, hidden_size: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive the previous stage's (hidden, residual) for ``num_tokens`` tokens."""
    out = tuple(torch.empty(num_tokens, hidden_size, dtype=dtype, device=device) for _ in range(2))
    for t in out:
        dist.recv(t, src=_state.prev_rank, group=_state.pp_group)
    return out

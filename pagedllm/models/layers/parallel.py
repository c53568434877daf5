"""Tensor-parallel state of this worker: its rank and the group size.

Layers read it when they are built to decide which shard of each weight they
own. A single-process engine leaves it at rank 0 of 1; a tensor-parallel
executor calls ``set_tensor_parallel`` in each worker after
``torch.distributed`` is initialised and before the model is built.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1


def set_tensor_parallel(rank: int, size: int) -> None:
    """Declare this worker's tensor-parallel rank and group size (the default group)."""
    global _tp_rank, _tp_size
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor_parallel: rank {rank} is not in [0, {size})")
    _tp_rank, _tp_size = rank, size


def get_tp_rank() -> int:
    return _tp_rank


def get_tp_size() -> int:
    return _tp_size


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator``, raising ValueError naming ``what`` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (identity with one worker)."""
    if _tp_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each worker's ``x`` along the last dimension (identity with one worker)."""
    if _tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)

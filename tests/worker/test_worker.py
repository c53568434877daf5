"""Worker placement: rank and local rank (checked before any model is loaded)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.worker.worker import Worker, select_device


def test_cpu_device_whatever_the_local_rank() -> None:
    assert select_device(DeviceConfig(device="cpu"), local_rank=3) == torch.device("cpu")


@pytest.mark.parametrize("rank,local_rank", [(1, 0), (-1, 0), (0, -1)])
def test_rank_outside_the_world_is_a_value_error(rank: int, local_rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        Worker(ModelConfig(model=None), CacheConfig(), SchedulerConfig(), DeviceConfig(device="cpu"),
               ParallelConfig(), rank=rank, local_rank=local_rank)


@pytest.mark.gpu
def test_local_rank_picks_the_gpu() -> None:
    assert select_device(DeviceConfig(device="cuda"), local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="local_rank"):
        select_device(DeviceConfig(device="cuda"), local_rank=torch.cuda.device_count())

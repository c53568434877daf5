"""Build the executor that ``--distributed-executor-backend`` names (see backends.py)."""

from __future__ import annotations

import torch

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.executor.backends import resolve_backend
from pagedllm.executor.executor import Executor


def make_executor(backend: str | None, model_config: ModelConfig, cache_config: CacheConfig,
                  scheduler_config: SchedulerConfig, device_config: DeviceConfig,
                  parallel_config: ParallelConfig) -> Executor:
    configs = (model_config, cache_config, scheduler_config, device_config, parallel_config)
    local_gpus = torch.cuda.device_count() if device_config.device != "cpu" else 0
    backend = resolve_backend(backend, parallel_config.world_size, local_gpus)
    if backend == "ray":
        from pagedllm.executor.ray_executor import RayExecutor

        return RayExecutor(*configs)
    if backend == "mp":
        from pagedllm.executor.mp_executor import MultiprocExecutor

        return MultiprocExecutor(*configs)
    from pagedllm.executor.executor import UniProcExecutor

    return UniProcExecutor(*configs)

"""Which executor runs the workers: ``--distributed-executor-backend uni|mp|ray``.

Left unset it is chosen as vLLM does: ``uni`` (in this process) for a world of one,
``mp`` (one process per rank) for a larger world on this host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: EngineArgs validates the backend name through this module
    from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from pagedllm.executor.executor import Executor

BACKENDS = ("uni", "mp", "ray")


def resolve_backend(backend: str | None, parallel_config: ParallelConfig) -> str:
    """The backend name to use; a ValueError naming the field for one pagedllm lacks."""
    if backend is None:
        return "uni" if parallel_config.world_size == 1 else "mp"
    if backend not in BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "ray":
        raise ValueError("distributed_executor_backend='ray' is not supported yet (use uni or mp)")
    return backend


def make_executor(backend: str | None, model_config: ModelConfig, cache_config: CacheConfig,
                  scheduler_config: SchedulerConfig, device_config: DeviceConfig,
                  parallel_config: ParallelConfig) -> Executor:
    configs = (model_config, cache_config, scheduler_config, device_config, parallel_config)
    if resolve_backend(backend, parallel_config) == "mp":
        from pagedllm.executor.mp_executor import MultiprocExecutor

        return MultiprocExecutor(*configs)
    from pagedllm.executor.executor import UniProcExecutor

    return UniProcExecutor(*configs)

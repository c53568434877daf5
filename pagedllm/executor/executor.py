"""Executor: runs the workers. Today one worker in this process; tensor-parallel
(multiprocess) and Ray executors implement the same three calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from pagedllm.worker.async_output import StepHandle


class Executor(ABC):
    @abstractmethod
    def determine_num_blocks(self) -> int: ...

    @abstractmethod
    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None: ...

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launch a step; its output comes from the handle's ``get()`` (async scheduling).
        An executor that cannot run ahead executes it here."""
        from pagedllm.worker.async_output import DoneStep

        return DoneStep(self.execute_model(scheduler_output))


class UniProcExecutor(Executor):
    """One worker, rank 0 of a world of one, in this process."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, parallel_config: ParallelConfig | None = None) -> None:
        from pagedllm.worker.worker import Worker

        parallel_config = parallel_config or ParallelConfig()
        if parallel_config.world_size != 1:
            raise ValueError(f"UniProcExecutor runs one worker; this parallel config needs "
                             f"{parallel_config.world_size}")
        self.worker = Worker(model_config, cache_config, scheduler_config, device_config, parallel_config,
                             rank=0, local_rank=0)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.worker.initialize_cache(num_blocks, num_cpu_blocks)

    def kv_cache_bytes_per_block(self) -> int:
        return self.worker.kv_cache_bytes_per_block()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.worker.execute_model_async(scheduler_output)

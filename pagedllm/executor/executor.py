"""Executor: runs the workers. ``UniProcExecutor``: one worker in this process.
``MultiRankExecutor``: a worker per rank elsewhere (processes on this host, mp_executor.py;
Ray actors on a cluster, ray_executor.py), every rank running every call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

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


class MultiRankExecutor(Executor):
    """Every rank runs every call; the driver (tensor-parallel rank 0 of the last pipeline stage)
    answers with the sampled tokens. A subclass delivers calls (``_run``).

    Pipeline parallel: a stage before the last never sees sampled tokens, so each step hands those
    stages the tokens the last stage sampled in the step before (``Worker.execute_model``)."""

    def _init_ranks(self, parallel_config: ParallelConfig) -> None:
        self.parallel_config = parallel_config
        self.driver_rank = (parallel_config.pipeline_parallel_size - 1) * parallel_config.tensor_parallel_size
        self._last_sampled: dict[str, list[int]] = {}

    @abstractmethod
    def _run(self, method: str, args: tuple, earlier_args: tuple | None = None) -> list[Any]:
        """Run ``method(*args)`` on every rank (``earlier_args`` instead on the ranks before the driver
        when given); their answers in rank order. A rank that raises or dies is a RuntimeError naming it."""

    def determine_num_blocks(self) -> int:
        return min(self._run("determine_num_blocks", ()))  # every rank must hold every block

    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self._run("initialize_cache", (num_blocks, num_cpu_blocks))

    def kv_cache_bytes_per_block(self) -> int:
        return max(self._run("kv_cache_bytes_per_block", ()))  # the stage with the most layers

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.driver_rank == 0:  # one pipeline stage
            return self._run("execute_model", (scheduler_output,))[0]
        output = self._run("execute_model", (scheduler_output,), (scheduler_output, self._last_sampled))
        output = output[self.driver_rank]
        self._last_sampled = {req_id: tokens for req_id, tokens in zip(output.req_ids, output.sampled_token_ids)
                              if tokens}
        return output

"""Executor: runs the workers. ``UniProcExecutor``: one worker in this process.
``MultiRankExecutor``: a worker per rank elsewhere (processes on this host, mp_executor.py;
Ray actors on a cluster, ray_executor.py), every rank running every call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import TYPE_CHECKING, Any

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.errors import ExecutorDeadError

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
    answers with the sampled tokens. A subclass delivers calls (``_send``) and reads the answers to the
    oldest outstanding one (``_receive``); steps may be outstanding several at a time (async scheduling,
    and pipeline parallel where each stage works on its own batch), their answers read in launch order.

    Pipeline parallel: a stage before the last never sees sampled tokens, so each step hands those
    stages the tokens the last stage sampled in the steps finished since the previous launch
    (``Worker.execute_model``); a request is never in two steps at once there (the scheduler waits for
    its token), so its tokens always arrive before its next step."""

    def _init_ranks(self, parallel_config: ParallelConfig) -> None:
        self.parallel_config = parallel_config
        self.driver_rank = (parallel_config.pipeline_parallel_size - 1) * parallel_config.tensor_parallel_size
        # Pipeline parallel: req id -> (the step that sampled them, tokens), for the stages before the last.
        self._last_sampled: dict[str, tuple[int, list[int]]] = {}
        self._num_launched = self._num_finished = 0
        # What each outstanding call's answer carries, oldest first: a step's output, or nothing (None).
        self._answers: deque[int | None] = deque()
        self._deferred: int | None = None  # the step the workers launched but answer for only later
        self._finished: dict[int, ModelRunnerOutput] = {}  # outputs read before their handle asked

    @abstractmethod
    def _send(self, method: str, args: tuple, earlier_args: tuple | None = None) -> None:
        """Start ``method(*args)`` on every rank (``earlier_args`` instead on the ranks before the driver)."""

    @abstractmethod
    def _receive(self) -> list[Any]:
        """Every rank's answer to the oldest call not yet received, in rank order. A rank that raises or
        dies is an ``ExecutorDeadError`` naming it."""

    def _run(self, method: str, args: tuple) -> list[Any]:
        self._send(method, args)
        return self._receive()

    def determine_num_blocks(self) -> int:
        return min(self._run("determine_num_blocks", ()))  # every rank must hold every block

    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self._run("initialize_cache", (num_blocks, num_cpu_blocks))

    def kv_cache_bytes_per_block(self) -> int:
        return max(self._run("kv_cache_bytes_per_block", ()))  # the stage with the most layers

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._wait_step(self._launch_step(scheduler_output, on_device=False))

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """One stage: the workers run the step asynchronously too (``Worker.execute_model_deferred``: step N's
        answer comes once N+1 is queued behind it on the device). Pipeline stages run each step
        synchronously: there the overlap is between stages."""
        return _LaunchedStep(self, self._launch_step(scheduler_output, on_device=self.driver_rank == 0))

    def _launch_step(self, scheduler_output: SchedulerOutput, on_device: bool) -> int:
        step = self._num_launched
        self._num_launched += 1
        if on_device:
            self._send("execute_model_deferred", (scheduler_output,))
            self._answers.append(self._deferred)  # this call answers for the step launched before it
            self._deferred = step
            return step
        self._finish_deferred()
        earlier = None
        if self.driver_rank:  # pipeline parallel
            earlier, self._last_sampled = (scheduler_output, self._last_sampled), {}
        self._send("execute_model", (scheduler_output,), earlier)
        self._answers.append(step)
        return step

    def _finish_deferred(self) -> None:
        """Ask the workers for the deferred step's answer (no step is launched behind it)."""
        if self._deferred is not None:
            self._send("finish_deferred", ())
            self._answers.append(self._deferred)
            self._deferred = None

    def _wait_step(self, step: int) -> ModelRunnerOutput:
        while step not in self._finished:
            if not self._answers:
                self._finish_deferred()
            carries = self._answers.popleft()
            try:
                output = self._receive()[self.driver_rank]
            except ExecutorDeadError:
                raise
            except RuntimeError as e:  # mid-pipeline, the calls and answers no longer pair up
                if self._answers or self._deferred is not None:
                    raise ExecutorDeadError(str(e)) from e
                raise
            if carries is None:
                continue
            if self.driver_rank:
                self._last_sampled.update((req_id, (carries, tokens)) for req_id, tokens
                                          in zip(output.req_ids, output.sampled_token_ids) if tokens)
            self._finished[carries] = output
            self._num_finished += 1
        return self._finished.pop(step)


class _LaunchedStep:
    """A step launched on every rank; ``get()`` waits for its answers (StepHandle's interface)."""

    def __init__(self, executor: MultiRankExecutor, step: int) -> None:
        self.executor, self.step = executor, step

    def get(self) -> ModelRunnerOutput:
        return self.executor._wait_step(self.step)

"""Multiprocess executor: each rank's worker runs in a process of its own, started
by the engine (vLLM's ``mp`` backend).

Today the world is one rank (``--tensor-parallel-size 1``): the worker runs in a
child process and the engine talks to it over a pipe. That moves the model's
Python work off the engine's process, and it is the frame larger worlds slot into.

Failure: a worker that raises or dies makes the call fail with a ``RuntimeError``
naming its rank, never a hang. Workers die with their parent: each asks the kernel
for SIGKILL when the parent goes (``PR_SET_PDEATHSIG``), and ``shutdown`` (also
run when the executor is garbage collected) stops them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import traceback
import weakref
from typing import Any

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.executor import Executor

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5  # how often a waiting call checks that the worker is alive
_STARTUP_TIMEOUT_S = 600.0
_JOIN_TIMEOUT_S = 5.0


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent exits (Linux); exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: shutdown and the daemon flag still stop us
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(conn, parent_pid: int, configs: tuple, rank: int, local_rank: int) -> None:
    """A worker process: build the Worker, then answer (method, args) calls until None."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the engine, which shuts us down
    from pagedllm.worker.worker import Worker

    try:
        worker = Worker(*configs, rank=rank, local_rank=local_rank)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            call = conn.recv()
        except EOFError:
            return
        if call is None:
            return
        method, args = call
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class _WorkerHandle:
    """One worker process and its end of the pipe."""

    def __init__(self, rank: int, configs: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the engine's threads and CUDA state
        self.rank = rank
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, name=f"pagedllm-worker-{rank}", daemon=True,
                                   args=(child_conn, os.getpid(), configs, rank, rank))
        self.process.start()
        child_conn.close()

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        self._send((method, args))
        return self.result(timeout)

    def _send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise self._dead_error() from exc

    def result(self, timeout: float | None = None) -> Any:
        """The worker's answer; a RuntimeError naming the rank if it raised or died."""
        waited = 0.0
        while not self.conn.poll(_POLL_S):
            waited += _POLL_S
            if not self.process.is_alive():
                raise self._dead_error()
            if timeout is not None and waited >= timeout:
                raise RuntimeError(f"worker rank {self.rank} did not answer within {timeout:.0f} s")
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise self._dead_error() from exc
        if status == "error":
            raise RuntimeError(f"worker rank {self.rank} failed:\n{value}")
        return value

    def _dead_error(self) -> RuntimeError:
        self.process.join(_POLL_S)
        return RuntimeError(f"worker rank {self.rank} died (exit code {self.process.exitcode})")

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_JOIN_TIMEOUT_S)
        self.conn.close()


def _stop_all(handles: list[_WorkerHandle]) -> None:
    for handle in handles:
        handle.stop()


class MultiprocExecutor(Executor):
    """One worker process per rank on this host; rank 0 (the driver) returns the sampled tokens."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, parallel_config: ParallelConfig | None = None) -> None:
        parallel_config = parallel_config or ParallelConfig()
        if parallel_config.world_size != 1:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {parallel_config.world_size} "
                             f"is not supported yet: the mp executor runs one worker process (use 1)")
        configs = (model_config, cache_config, scheduler_config, device_config, parallel_config)
        self.workers = [_WorkerHandle(rank, configs) for rank in range(parallel_config.world_size)]
        self._finalizer = weakref.finalize(self, _stop_all, self.workers)
        try:
            for worker in self.workers:
                worker.result(timeout=_STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    def _driver_call(self, method: str, *args: Any) -> Any:
        return self.workers[0].call(method, *args)

    def determine_num_blocks(self) -> int:
        return self._driver_call("determine_num_blocks")

    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self._driver_call("initialize_cache", num_blocks, num_cpu_blocks)

    def kv_cache_bytes_per_block(self) -> int:
        return self._driver_call("kv_cache_bytes_per_block")

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._driver_call("execute_model", scheduler_output)

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    def shutdown(self) -> None:
        """Stop every worker process (idempotent; also run at garbage collection)."""
        self._finalizer()

"""Multiprocess executor: each rank's worker runs in a process of its own, started
by the engine (vLLM's ``mp`` backend), all on this host.

The engine talks to each worker over a pipe: a call is pickled once and written
to every worker's pipe; every rank runs it, and the driver (tensor-parallel rank
0 of the last pipeline stage) answers with the sampled tokens. The ranks meet
in torch.distributed (gloo on the CPU, NCCL on GPUs) at a TCP port on
127.0.0.1 chosen here; their collectives never pass through the engine.

Pipeline parallel: a stage before the last never sees sampled tokens, so the
next call hands it the tokens the last stage sampled in the previous step.

Failure: a worker that raises or dies makes the call fail with a ``RuntimeError``
naming its rank, never a hang (while the others wait in a collective with it).
Workers die with their parent: each asks the kernel for SIGKILL when the parent
goes (``PR_SET_PDEATHSIG``), and ``shutdown`` (also run when the executor is
garbage collected) stops them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.executor.errors import ExecutorDeadError
from pagedllm.executor.executor import MultiRankExecutor

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
    # Answers go out from a thread of their own: with several steps in flight (pipeline parallel) the engine
    # may be writing the next call while a large answer waits to be read, and neither side may block the other.
    answers: queue.SimpleQueue = queue.SimpleQueue()
    writer = threading.Thread(target=_write_answers, args=(conn, answers), name="pagedllm-answers", daemon=True)
    writer.start()
    while True:
        try:
            call = conn.recv()
        except EOFError:
            break
        if call is None:
            break
        method, args = call
        try:
            answers.put(("ok", getattr(worker, method)(*args)))
        except BaseException:
            answers.put(("error", traceback.format_exc()))
    answers.put(None)
    writer.join(_JOIN_TIMEOUT_S)


def _write_answers(conn, answers: queue.SimpleQueue) -> None:  # noqa: ANN001 - a multiprocessing Connection
    while (answer := answers.get()) is not None:
        try:
            conn.send(answer)
        except OSError:  # the engine is gone
            return


class _WorkerHandle:
    """One worker process and its end of the pipe."""

    def __init__(self, rank: int, configs: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the engine's threads and CUDA state
        self.rank = rank
        self.conn, child_conn = ctx.Pipe()
        # One host: the local rank (this rank's GPU) is the rank.
        self.process = ctx.Process(target=_worker_main, name=f"pagedllm-worker-{rank}", daemon=True,
                                   args=(child_conn, os.getpid(), configs, rank, rank))
        self.process.start()
        child_conn.close()

    def send_bytes(self, payload: bytes) -> None:
        """Write a pickled call (``recv`` in the worker unpickles it)."""
        try:
            self.conn.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise self._dead_error() from exc

    def result(self) -> Any:
        """The answer waiting on the pipe (``gather_results`` waits and checks liveness); a RuntimeError
        naming the rank if it raised, an ExecutorDeadError if it died."""
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise self._dead_error() from exc
        if status == "error":
            raise RuntimeError(f"worker rank {self.rank} failed:\n{value}")
        return value

    def _dead_error(self) -> ExecutorDeadError:
        self.process.join(_POLL_S)
        return ExecutorDeadError(f"worker rank {self.rank} died (exit code {self.process.exitcode})")

    def ask_to_stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass

    def stop(self, deadline: float) -> None:
        """Wait for the process until ``deadline`` (time.monotonic), then kill it."""
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():  # e.g. waiting in a collective for a rank that died
            self.process.kill()
            self.process.join(_JOIN_TIMEOUT_S)
        self.conn.close()


def _stop_all(handles: list[_WorkerHandle]) -> None:
    for handle in handles:
        handle.ask_to_stop()
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    for handle in handles:
        handle.stop(deadline)


def _root_cause(error: RuntimeError, others: list[_WorkerHandle], world_size: int) -> RuntimeError:
    """A rank's failure, or the death of another rank that caused it (a collective with a dead peer
    fails on the living ranks first). In a world of more than one any failure is fatal."""
    deadline = time.monotonic() + 2 * _POLL_S
    while time.monotonic() < deadline:
        for handle in others:
            if not handle.process.is_alive() and not handle.conn.poll():  # gone without a word
                return handle._dead_error()
        time.sleep(_POLL_S / 10)
    if world_size > 1 and not isinstance(error, ExecutorDeadError):
        return ExecutorDeadError(str(error))
    return error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_results(handles: list[_WorkerHandle], timeout: float | None = None) -> list[Any]:
    """Every worker's answer to the call just sent, in rank order. The first worker to raise or die
    fails the call at once (the others may be waiting for it in a collective)."""
    results: dict[int, Any] = {}
    pending = {h.conn: h for h in handles}
    start = time.monotonic()
    while pending:
        for conn in wait(list(pending), timeout=_POLL_S):
            handle = pending.pop(conn)
            try:
                results[handle.rank] = handle.result()
            except RuntimeError as error:
                raise _root_cause(error, list(pending.values()), len(handles)) from error
        if not pending:
            break
        for handle in pending.values():
            if not handle.process.is_alive() and not handle.conn.poll():
                raise handle._dead_error()
        if timeout is not None and time.monotonic() - start >= timeout:
            ranks = ", ".join(str(h.rank) for h in pending.values())
            raise RuntimeError(f"worker rank(s) {ranks} did not answer within {timeout:.0f} s")
    return [results[h.rank] for h in handles]


class MultiprocExecutor(MultiRankExecutor):
    """One worker process per rank on this host."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, parallel_config: ParallelConfig | None = None) -> None:
        parallel_config = parallel_config or ParallelConfig()
        if parallel_config.world_size > 1 and parallel_config.distributed_init_method is None:
            parallel_config = dataclasses.replace(parallel_config,
                                                  distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
        self._init_ranks(parallel_config)
        configs = (model_config, cache_config, scheduler_config, device_config, parallel_config)
        self.workers = [_WorkerHandle(rank, configs) for rank in range(parallel_config.world_size)]
        self._finalizer = weakref.finalize(self, _stop_all, self.workers)
        try:
            gather_results(self.workers, timeout=_STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    def _send(self, method: str, args: tuple, earlier_args: tuple | None = None) -> None:
        payload = bytes(ForkingPickler.dumps((method, args)))  # pickled once for every rank
        earlier = payload if earlier_args is None else bytes(ForkingPickler.dumps((method, earlier_args)))
        for worker in self.workers:
            worker.send_bytes(earlier if worker.rank < self.driver_rank else payload)

    def _receive(self) -> list[Any]:
        return gather_results(self.workers)  # each pipe answers its calls in order

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    def shutdown(self) -> None:
        """Stop every worker process (idempotent; also run at garbage collection)."""
        self._finalizer()

"""Ray executor: one worker per rank as a Ray actor, placed by a placement group with one bundle per
GPU (or CPU), across the nodes of a Ray cluster (vLLM's ``ray`` backend).

The engine joins the running cluster (``RAY_ADDRESS``, or the one this process or this host already
runs) or starts a local one. Rank 0's node hosts the torch.distributed rendezvous; the ranks then talk
to each other directly (NCCL or gloo), and the engine reaches them only through Ray calls: each call's
arguments are put in Ray's object store once and read by every actor.

Ray is imported here only, when this executor is built. A rank that raises or dies (RayActorError) fails
the call with ``ExecutorDeadError`` naming it; ``shutdown`` kills the actors and frees the placement group.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import weakref
from collections import deque
from typing import Any

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.executor.errors import ExecutorDeadError
from pagedllm.executor.executor import MultiRankExecutor

_STARTUP_TIMEOUT_S = 600.0


class RayWorkerWrapper:
    """The actor's class: a Worker built once the rendezvous address is known."""

    def __init__(self) -> None:
        self.worker = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def init_worker(self, configs: tuple, rank: int, local_rank: int) -> None:
        from pagedllm.worker.worker import Worker

        self.worker = Worker(*configs, rank=rank, local_rank=local_rank)

    def execute(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


def _connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins RAY_ADDRESS or a cluster already running on this host, else starts a local one.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)


def _stop(actors: list, placement_group: Any) -> None:
    import ray

    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        ray.util.remove_placement_group(placement_group)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _first_cause(failed: list, rank_of: dict) -> ExecutorDeadError:
    """The error to report among finished calls, at least one of which failed: a dead rank first (a
    collective with a dead peer fails on the living ranks too), else the first rank that raised."""
    import ray

    raised = None
    for ref in failed:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as e:
            return ExecutorDeadError(f"worker rank {rank_of[ref]} died: {e}")
        except ray.exceptions.RayTaskError as e:
            raised = raised or ExecutorDeadError(f"worker rank {rank_of[ref]} failed:\n{e}")
    return raised


class RayExecutor(MultiRankExecutor):
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, parallel_config: ParallelConfig | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        parallel_config = parallel_config or ParallelConfig()
        _connect_ray()
        world = parallel_config.world_size
        self.use_gpu = device_config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"GPU": 1, "CPU": 1} if self.use_gpu else {"CPU": 1}
        self.placement_group = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=_STARTUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ValueError(f"the Ray cluster cannot place {world} workers of {bundle} "
                             f"(it has {ray.cluster_resources()})") from None
        actor_cls = ray.remote(RayWorkerWrapper)
        self.actors = [
            actor_cls.options(num_cpus=1, num_gpus=1 if self.use_gpu else 0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  self.placement_group, placement_group_bundle_index=rank)).remote()
            for rank in range(world)
        ]
        self._finalizer = weakref.finalize(self, _stop, self.actors, self.placement_group)
        try:
            self._start_workers((model_config, cache_config, scheduler_config, device_config), parallel_config)
        except BaseException:
            self.shutdown()
            raise

    def _start_workers(self, configs: tuple, parallel_config: ParallelConfig) -> None:
        import ray

        ips = ray.get([actor.node_ip.remote() for actor in self.actors])
        if parallel_config.distributed_init_method is None:
            port = ray.get(self.actors[0].free_port.remote())
            parallel_config = dataclasses.replace(parallel_config, distributed_init_method=f"tcp://{ips[0]}:{port}")
        self._init_ranks(parallel_config)
        self._outstanding: deque[list] = deque()  # each launched call's refs, oldest first
        # Ray gives each GPU actor one visible device: its local rank is 0.
        pending = [actor.init_worker.remote((*configs, parallel_config), rank, 0)
                   for rank, actor in enumerate(self.actors)]
        self._gather(pending, timeout=_STARTUP_TIMEOUT_S)

    def _send(self, method: str, args: tuple, earlier_args: tuple | None = None) -> None:
        import ray

        refs = [ray.put(a) for a in args]  # in the object store once, read by every actor
        earlier = refs if earlier_args is None else [ray.put(a) for a in earlier_args]
        # An actor runs one caller's calls in the order they were made.
        self._outstanding.append([actor.execute.remote(method, *(earlier if rank < self.driver_rank else refs))
                                  for rank, actor in enumerate(self.actors)])

    def _receive(self) -> list[Any]:
        return self._gather(self._outstanding.popleft())

    def _gather(self, pending: list, timeout: float | None = None) -> list[Any]:
        """Every rank's answer in rank order; the first rank to fail fails the call at once."""
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(pending)}
        results: dict[int, Any] = {}
        start, waiting = time.monotonic(), list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                    others, _ = ray.wait(waiting, num_returns=len(waiting), timeout=5.0)
                    raise _first_cause([ref, *others], rank_of) from None
            if timeout is not None and time.monotonic() - start > timeout:
                raise ExecutorDeadError(f"worker ranks {sorted(rank_of[r] for r in waiting)} did not answer "
                                        f"within {timeout:.0f} s")
        return [results[rank] for rank in range(len(pending))]

    def shutdown(self) -> None:
        """Kill the actors and free their placement group (idempotent; also run at garbage collection)."""
        self._finalizer()

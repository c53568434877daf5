"""Worker: owns one device. Loads the model (through the ModelRunner), profiles memory
to size the KV cache, and executes steps.

One worker runs per rank of ``ParallelConfig.world_size``; ``rank`` is its place
in the whole group and ``local_rank`` its GPU on this host (``cuda:local_rank``).
In a world of more than one, the worker joins it (torch.distributed at
``ParallelConfig.distributed_init_method``) before it builds its share of the model.
Every rank runs every step; the driver (tensor-parallel rank 0 of the last
pipeline stage) returns the sampled tokens, the others return None.
"""

from __future__ import annotations

import logging
import os

import torch

from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from pagedllm.models.layers.parallel import ParallelState, destroy_parallel, init_parallel
from pagedllm.worker.async_output import StepHandle
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)
GiB = 1 << 30


def select_device(device_config: DeviceConfig, local_rank: int = 0) -> torch.device:
    """``cuda:local_rank`` (made the current device, where kernels launch), or the CPU."""
    if device_config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU")
    if device_config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local_rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


class Worker:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, parallel_config: ParallelConfig | None = None, rank: int = 0,
                 local_rank: int = 0) -> None:
        self.parallel_config = parallel_config or ParallelConfig()
        if not 0 <= rank < self.parallel_config.world_size or local_rank < 0:
            raise ValueError(f"rank {rank} / local_rank {local_rank} is not in a world of "
                             f"{self.parallel_config.world_size}")
        self.rank, self.local_rank = rank, local_rank
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = select_device(device_config, local_rank)
        self.memory_profile: dict[str, float] = {}
        self.parallel = self._join_world(local_rank)
        self.is_driver = self.parallel.is_last_stage and self.parallel.tp_rank == 0
        self._launched: StepHandle | None = None  # execute_model_deferred's step, answered for later
        self._num_steps = 0  # execute_model calls so far (the executor counts the same)
        self._added_at: dict[str, int] = {}  # pipeline parallel: req id -> the step that brought it
        torch.manual_seed(model_config.seed)
        self.model_runner = ModelRunner(model_config, cache_config, scheduler_config, device_config, self.device,
                                        parallel=self.parallel)
        # Every rank of the last stage samples: the same seed, the same logits, the same tokens.
        torch.manual_seed(model_config.seed)

    def _join_world(self, local_rank: int) -> ParallelState:
        """Join a world of more than one (and take a fair share of this host's CPU threads)."""
        pc = self.parallel_config
        if pc.world_size == 1:
            return ParallelState()
        if pc.distributed_init_method is None:
            raise ValueError("parallel_config.distributed_init_method is needed for a world of more than one")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // pc.world_size))
        return init_parallel(pc.tensor_parallel_size, pc.pipeline_parallel_size, self.rank,
                             pc.distributed_init_method, self.device)

    def determine_num_blocks(self) -> int:
        """KV cache blocks that fit: profiled on a GPU, a fixed budget on the CPU."""
        per_block = self.model_runner.kv_cache_bytes_per_block()
        if self.cache_config.num_gpu_blocks is not None:
            num_blocks = self.cache_config.num_gpu_blocks
        elif self.device.type == "cuda":
            num_blocks = self._profile_gpu_blocks(per_block)
        else:
            num_blocks = int(self.cache_config.cpu_kv_cache_gib * GiB // per_block)
        if num_blocks < 1:
            raise ValueError("no memory is left for the KV cache; raise gpu_memory_utilization or use a smaller model")
        max_len = self.model_runner.model_config.max_model_len
        concurrency = num_blocks * self.cache_config.block_size / max_len
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB); maximum concurrency for %d-token requests: %.1fx",
                    num_blocks, self.cache_config.block_size, num_blocks * per_block / GiB, max_len, concurrency)
        return num_blocks

    def _profile_gpu_blocks(self, bytes_per_block: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
        scratch_kv = self.model_runner.profile_run()
        torch.cuda.synchronize()
        # The profile's scratch KV cache was live at the peak but is not an activation.
        peak_torch = torch.cuda.max_memory_allocated() - scratch_kv
        free, total = torch.cuda.mem_get_info()
        # Memory used outside PyTorch's allocator (CUDA context, cuBLAS workspaces, NCCL).
        non_torch = (total - free) - torch.cuda.memory_reserved()
        available = total * self.cache_config.gpu_memory_utilization - peak_torch - non_torch
        num_blocks = int(available // bytes_per_block)
        self.memory_profile = {"total": total, "weights": weights, "peak_torch": peak_torch, "non_torch": non_torch,
                               "kv_cache": num_blocks * bytes_per_block}
        logger.info("memory profile: total %.1f GiB, weights %.2f GiB, weights+activations peak %.2f GiB, "
                    "non-torch %.2f GiB, KV cache gets %.2f GiB", total / GiB, weights / GiB, peak_torch / GiB,
                    non_torch / GiB, available / GiB)
        torch.cuda.empty_cache()
        return num_blocks

    def initialize_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.model_runner.initialize_kv_cache(num_blocks, num_cpu_blocks)

    def kv_cache_bytes_per_block(self) -> int:
        return self.model_runner.kv_cache_bytes_per_block()

    def execute_model(self, scheduler_output: SchedulerOutput,
                      earlier_tokens: dict[str, tuple[int, list[int]]] | None = None) -> ModelRunnerOutput | None:
        """One step. ``earlier_tokens``: req id -> (step, tokens) the last stage sampled in steps finished
        since, which a stage before it has not seen (pipeline parallel). Returns the output on the driver."""
        step, self._num_steps = self._num_steps, self._num_steps + 1  # every rank counts the same calls
        if earlier_tokens:
            # A request id that ended and came back while its step was in the pipeline: that step's token
            # belongs to the old request (the scheduler drops it too).
            tokens = {req_id: toks for req_id, (sampled_at, toks) in earlier_tokens.items()
                      if self._added_at.get(req_id, sampled_at + 1) <= sampled_at}
            self.model_runner.input_batch.append_tokens_of(tokens)
        if self.parallel.pp_size > 1:
            for req_id in scheduler_output.finished_req_ids:
                self._added_at.pop(req_id, None)
            for new in scheduler_output.scheduled_new_reqs:
                self._added_at[new.req_id] = step
        output = self.model_runner.execute_model(scheduler_output)
        return output if self.is_driver else None

    def execute_model_deferred(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """Launch a step on the device, then finish the step launched before it and return that one's
        output (None for none, and on every rank but the driver): a worker in a process of its own reads
        step N's tokens only once step N+1 is queued behind it (async scheduling)."""
        previous, self._launched = self._launched, self.model_runner.execute_model_async(scheduler_output)
        return self._finish(previous)

    def finish_deferred(self) -> ModelRunnerOutput | None:
        """The output of the step ``execute_model_deferred`` launched last (no step follows it yet)."""
        previous, self._launched = self._launched, None
        return self._finish(previous)

    def _finish(self, step: StepHandle | None) -> ModelRunnerOutput | None:
        """Read a launched step's tokens into the rows (every rank); its output on the driver."""
        output = step.get() if step is not None else None
        return output if self.is_driver else None

    def shutdown(self) -> None:
        if self.parallel_config.world_size > 1:
            destroy_parallel()

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.model_runner.execute_model_async(scheduler_output)

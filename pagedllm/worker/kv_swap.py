"""Swap space: a CPU copy of the KV cache layout that preempted requests' blocks move to and back.

Block ids on both sides come from the scheduler; this module only moves bytes. On a
GPU the CPU cache is pinned so the copies run at full PCIe/NVLink-C2C speed.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import kv_bytes


class SwapSpace:
    def __init__(self, gpu_caches: list[torch.Tensor], num_cpu_blocks: int) -> None:
        self.gpu_caches = gpu_caches
        pin = gpu_caches[0].device.type == "cuda"
        shape = (num_cpu_blocks, *gpu_caches[0].shape[1:])
        self.cpu_caches = [torch.zeros(shape, dtype=gpu_caches[0].dtype, pin_memory=pin) for _ in gpu_caches]

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(gpu block, cpu block) pairs: device -> host."""
        gpu_ids = torch.tensor([g for g, _ in pairs], device=self.gpu_caches[0].device)
        cpu_ids = torch.tensor([c for _, c in pairs])
        for gpu, cpu in zip(map(kv_bytes, self.gpu_caches), map(kv_bytes, self.cpu_caches)):
            cpu.index_copy_(0, cpu_ids, gpu.index_select(0, gpu_ids).cpu())

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(cpu block, gpu block) pairs: host -> device."""
        cpu_ids = torch.tensor([c for c, _ in pairs])
        gpu_ids = torch.tensor([g for _, g in pairs], device=self.gpu_caches[0].device)
        for gpu, cpu in zip(map(kv_bytes, self.gpu_caches), map(kv_bytes, self.cpu_caches)):
            gpu.index_copy_(0, gpu_ids, cpu.index_select(0, cpu_ids).to(gpu.device, non_blocking=True))

"""CUDA graphs for decode-only batches.

A decode step launches hundreds of small kernels; replaying a captured graph
removes the launch gaps. One graph is captured per batch-size bucket
(1, 2, 4, 8, 16, 24, ... up to max_num_seqs); a batch of n requests replays the
smallest bucket >= n, padded with rows that write nowhere (slot -1) and attend to
nothing (seq_len 0). All graphs read the same persistent device buffers, which
each step fills from pinned host memory with non-blocking copies.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from pagedllm.worker.input_batch import FlatBatch
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 8))
    sizes = [s for s in sizes if s <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_bs = self.buckets[-1]
        max_len = runner.model_config.max_model_len
        self.max_blocks = -(-max_len // runner.block_size)
        self.max_seq_len = max_len
        dev = self.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((self.max_bs,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(self.max_bs, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((self.max_bs, self.max_blocks), dtype=torch.int32, device=dev)
        # Pinned staging: [input_ids | positions | slot_mapping] and seq_lens, per step.
        self.host_i64 = torch.zeros((3, self.max_bs), dtype=torch.long).pin_memory()
        self.host_seq = torch.zeros(self.max_bs, dtype=torch.int32).pin_memory()
        self.host_bt = torch.zeros((self.max_bs, self.max_blocks), dtype=torch.int32).pin_memory()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], max_query_len=1, max_seq_len=self.max_seq_len,
            num_actual_tokens=bs)

    @torch.inference_mode()
    def capture(self) -> None:
        model, kv = self.runner.model, self.runner.kv_caches
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first: later graphs reuse its memory
            md = self._metadata(bs)
            for _ in range(2):  # warm up (Triton autotune/compile) outside the graph
                model(self.input_ids[:bs], self.positions[:bs], kv, md)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(self.input_ids[:bs], self.positions[:bs], kv, md)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, batch: FlatBatch) -> bool:
        return batch.max_query_len == 1 and len(batch.req_ids) <= self.max_bs

    def run(self, batch: FlatBatch) -> torch.Tensor:
        n = len(batch.req_ids)
        bs = next(b for b in self.buckets if b >= n)
        h = self.host_i64
        h[0, :n] = torch.from_numpy(batch.input_ids)
        h[1, :n] = torch.from_numpy(batch.positions)
        h[2, :n] = torch.from_numpy(batch.slot_mapping)
        h[2, n:bs] = -1
        self.host_seq[:n] = torch.from_numpy(batch.seq_lens)
        self.host_seq[n:bs] = 0
        w = batch.block_tables.shape[1]
        self.host_bt[:n, :w] = torch.from_numpy(np.ascontiguousarray(batch.block_tables))
        self.input_ids[:bs].copy_(h[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(h[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(h[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self.host_seq[:bs], non_blocking=True)
        self.block_tables[:n, :w].copy_(self.host_bt[:n, :w], non_blocking=True)
        self.graphs[bs].replay()
        # The pinned staging buffers are safe to reuse next step: the runner reads the
        # sampled ids (a host sync) before it builds the next batch.
        return self.outputs[bs][:n]

"""CUDA graphs for decode-only batches.

A decode step launches hundreds of small kernels; replaying a captured graph
removes the launch gaps. One graph is captured per batch-size bucket
(1, 2, 4, 8, 16, 24, ... up to max_num_seqs); a batch of n requests replays the
smallest bucket >= n, padded with rows that write nowhere (slot -1) and attend to
nothing (seq_len 0). All graphs read the persistent ``InputBuffers`` they are
given, which each step fills from pinned host memory with non-blocking copies.
The graph covers the layers only; the LM head and the sampler run eagerly on the
rows that sample. The runner hands over what the graphs read (model, KV caches,
input buffers, max model length); this module does not know the ModelRunner.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pagedllm.worker.input_batch import FlatBatch
    from pagedllm.worker.input_buffers import InputBuffers

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 8))
    sizes = [s for s in sizes if s <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphRunner:
    """Captures one decode-step graph per batch-size bucket and replays the smallest that fits."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], buffers: InputBuffers, max_model_len: int,
                 max_batch_size: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_bs = self.buckets[-1]
        # Only steers the decode split count; the kernels read each length from seq_lens.
        self.max_seq_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bs -> (bs, hidden_size), written by each replay

    @torch.inference_mode()
    def capture(self) -> None:
        model, kv = self.model, self.kv_caches
        buffers = self.buffers
        buffers.fill_padding()  # warm-up and capture write no KV and attend to nothing
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
            input_ids, positions = buffers.token_views(bs)
            md = buffers.metadata(bs, bs, buffers.max_num_blocks, max_query_len=1, max_seq_len=self.max_seq_len)
            for _ in range(2):  # warm up (Triton compiles, cuBLAS picks its kernels) outside the graph
                model(input_ids, positions, kv, md)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(input_ids, positions, kv, md)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for %d decode batch sizes (%s) in %.1f s", len(self.buckets),
                    self.buckets, time.perf_counter() - start)

    def can_run(self, batch: FlatBatch) -> bool:
        return batch.max_query_len == 1 and batch.num_reqs <= self.max_bs

    def run(self, batch: FlatBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket's graph on ``batch``: (hidden (n, hidden_size), logits_indices)."""
        n = batch.num_reqs
        bs = next(b for b in self.buckets if b >= n)
        _, _, _, logits_indices = self.buffers.load(batch, pad_to=bs)
        self.graphs[bs].replay()
        # The output is overwritten by the next replay of this bucket; the runner consumes it
        # (logits, sampling, a host sync) before it builds the next step.
        return self.outputs[bs][:n], logits_indices

"""A minimal test-side model runner: allocates blocks and builds AttentionMetadata by hand.

It drives a model through the paged KV cache the way the engine's runner does
(ragged batches of prefill chunks and decodes, block tables, slot mapping),
with nothing else in the way, so model tests can compare logits and greedy
continuations against HF transformers.

Blocks are handed out in a shuffled order (block 0 stays reserved as the null
block) so that a sequence's blocks are not contiguous in the cache.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.models.registry import kv_cache_shape_info


class PagedDriver:
    def __init__(self, model: nn.Module, hf_config, block_size: int, num_blocks: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, tp_size: int = 1) -> None:
        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(hf_config, tp_size)
        shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)  # this worker's heads
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.model, self.block_size, self.device = model, block_size, device
        self.free_blocks = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def _slots(self, seq_id: int, num_new: int) -> tuple[list[int], list[int]]:
        """Positions and cache slots of a sequence's next num_new tokens, allocating blocks as needed."""
        table = self.block_tables.setdefault(seq_id, [])
        start = self.num_computed.get(seq_id, 0)
        positions = list(range(start, start + num_new))
        while len(table) * self.block_size < start + num_new:
            table.append(self.free_blocks.pop())
        slots = [table[p // self.block_size] * self.block_size + p % self.block_size for p in positions]
        self.num_computed[seq_id] = start + num_new
        return positions, slots

    @torch.inference_mode()
    def step(self, chunks: list[tuple[int, list[int]]], num_padding: int = 0) -> list[torch.Tensor]:
        """One forward over ``(seq_id, new token ids)`` chunks; returns each chunk's logits (q_len, vocab).

        ``num_padding`` extra tokens with slot -1 are appended, as CUDA-graph padding would be.
        """
        input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for seq_id, token_ids in chunks:
            pos, slot = self._slots(seq_id, len(token_ids))
            input_ids += token_ids
            positions += pos
            slots += slot
            seq_lens.append(self.num_computed[seq_id])
            starts.append(starts[-1] + len(token_ids))
        num_actual = len(input_ids)
        input_ids += [0] * num_padding
        positions += [0] * num_padding
        slots += [-1] * num_padding
        max_blocks = max(len(self.block_tables[s]) for s, _ in chunks)
        tables = [self.block_tables[s] + [0] * (max_blocks - len(self.block_tables[s])) for s, _ in chunks]
        dev = self.device
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(len(t) for _, t in chunks), max_seq_len=max(seq_lens),
            num_actual_tokens=num_actual, seq_lens_cpu=seq_lens, query_start_loc_cpu=starts,
        )
        hidden = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev),
                            self.kv_caches, md)
        logits = self.model.compute_logits(hidden[:num_actual])
        return [logits[starts[i]:starts[i + 1]] for i in range(len(chunks))]

    def greedy(self, prompts: list[list[int]], num_new_tokens: int, first_chunk: int | None = None) -> list[list[int]]:
        """Greedy continuations of several prompts run together; prompts optionally prefilled in two chunks."""
        chunks = [(i, p[:first_chunk] if first_chunk else p) for i, p in enumerate(prompts)]
        if first_chunk:
            self.step(chunks)
            chunks = [(i, p[first_chunk:]) for i, p in enumerate(prompts)]
        outputs: list[list[int]] = [[] for _ in prompts]
        for _ in range(num_new_tokens):
            logits = self.step(chunks)
            for i, row in enumerate(logits):
                outputs[i].append(int(row[-1].argmax()))
            chunks = [(i, [outputs[i][-1]]) for i in range(len(prompts))]
        return outputs

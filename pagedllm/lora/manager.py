"""LoRAManager: the worker's side of multi-LoRA serving.

Each step, before the forward, ``prepare`` looks at the adapter of every scheduled
request (``InputBatch.lora_ids``), loads adapters it has not seen from disk into an
LRU cache in CPU memory (``max_cpu_loras``), copies the step's adapters into device
slots (``LoRASlots``: at most ``max_loras``, evicting one no request of the step uses;
the scheduler never runs more distinct adapters than that), and fills what the
LoRALinear layers read: on a GPU the SGMV plan (tokens grouped by slot,
``FlatBatch.lora_plan``, copied to the device with the other inputs), on the CPU the
token indices of each slot.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pagedllm.config import LoRAConfig
from pagedllm.lora.adapter import LoRAAdapter, load_peft_adapter
from pagedllm.lora.layers import LoRAState, wrap_model
from pagedllm.lora.request import LoRARequest
from pagedllm.lora.slots import LoRASlots

if TYPE_CHECKING:
    from pagedllm.worker.input_batch import FlatBatch, InputBatch
    from pagedllm.worker.input_buffers import InputBuffers


def plan_capacity(max_num_tokens: int, config: LoRAConfig) -> int:
    """Blocks of the largest SGMV plan a step can need (the input buffers' size for it)."""
    from pagedllm.lora.triton_punica import num_plan_blocks

    return num_plan_blocks(max_num_tokens, config.max_loras)


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, buffers: InputBuffers | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        """``buffers``: the input buffers holding the SGMV plan (GPU); None on the CPU."""
        self.config = config
        self.device = device
        self.state = LoRAState(slots=None, max_loras=config.max_loras)  # slots set once the shapes are known
        if buffers is not None:
            self.state.perm, self.state.blocks = buffers.lora_plan()
        modules = wrap_model(model, self.state)
        self.slots = LoRASlots(config.max_loras, config.max_lora_rank, modules, device, dtype)
        self.state.slots = self.slots
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()  # CPU memory, LRU order

    def prepare(self, batch: FlatBatch, input_batch: InputBatch) -> None:
        """Activate the adapters of ``batch`` and lay out its tokens by slot (see the module docstring)."""
        ids = input_batch.lora_ids[batch.rows]
        state = self.state
        if not ids.any():
            batch.lora_plan, state.segments, state.active = None, [], False
            return
        distinct = set(np.unique(ids).tolist()) - {0}
        slot_of = np.full(int(ids.max()) + 1, -1, dtype=np.int32)
        for lora_id in distinct:
            adapter = self._adapter(input_batch.lora_requests[lora_id])
            slot_of[lora_id] = self.slots.activate(lora_id, adapter, in_use=distinct)
        token_slots = np.repeat(slot_of[ids], np.diff(batch.query_start_loc))
        state.active = True
        if state.perm is not None:  # GPU: the SGMV plan, copied with the step's inputs
            from pagedllm.lora.triton_punica import sgmv_plan

            batch.lora_plan = sgmv_plan(token_slots, state.blocks.shape[1])
            return
        segments = []
        for slot in np.unique(token_slots).tolist():
            if slot < 0:
                continue
            idx = np.flatnonzero(token_slots == slot)
            segments.append((slot, None if len(idx) == len(token_slots) else torch.from_numpy(idx)))
        state.segments = segments

    def _adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter's weights from the CPU cache, or read from disk (evicting the least recently used)."""
        adapter = self._loaded.get(request.lora_int_id)
        if adapter is not None:
            self._loaded.move_to_end(request.lora_int_id)
            return adapter
        adapter = load_peft_adapter(request.lora_path, self.config.max_lora_rank)
        self._loaded[request.lora_int_id] = adapter
        while len(self._loaded) > self.config.max_cpu_loras:
            self._loaded.popitem(last=False)
        return adapter

    @contextmanager
    def capturing(self):
        """While CUDA graphs are captured the LoRA kernels run (and are recorded) whatever the adapters."""
        self.state.active = True
        try:
            yield
        finally:
            self.state.active = False

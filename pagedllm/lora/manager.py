"""LoRAManager: the worker's side of multi-LoRA serving.

Each step, before the forward, ``prepare`` looks at the adapter of every scheduled
request (``InputBatch.lora_ids``), loads adapters it has not seen from disk into an
LRU cache in CPU memory (``max_cpu_loras``), copies the step's adapters into device
slots (``LoRASlots``: at most ``max_loras``, evicting one no request of the step uses;
the scheduler never runs more distinct adapters than that), and fills what the
LoRALinear layers read: each token's slot (``FlatBatch.lora_slots``, copied to the
device with the other inputs) and the per-slot token segments of the eager path.
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


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, token_slots: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.state = LoRAState(slots=None, token_slots=token_slots)  # slots set once the shapes are known
        shapes = wrap_model(model, self.state)
        self.slots = LoRASlots(config.max_loras, config.max_lora_rank, shapes, device, dtype)
        self.state.slots = self.slots
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()  # CPU memory, LRU order

    def prepare(self, batch: FlatBatch, input_batch: InputBatch) -> None:
        """Activate the adapters of ``batch`` and set each token's slot (see the module docstring)."""
        ids = input_batch.lora_ids[batch.rows]
        state = self.state
        if not ids.any():
            batch.lora_slots, state.segments = None, []
            return
        distinct = set(np.unique(ids).tolist()) - {0}
        slot_of = np.full(int(ids.max()) + 1, -1, dtype=np.int32)
        for lora_id in distinct:
            adapter = self._adapter(input_batch.lora_requests[lora_id])
            slot_of[lora_id] = self.slots.activate(lora_id, adapter, in_use=distinct)
        counts = np.diff(batch.query_start_loc)
        token_slots = np.repeat(slot_of[ids], counts)
        batch.lora_slots = token_slots
        segments = []
        for slot in np.unique(token_slots).tolist():
            if slot < 0:
                continue
            idx = np.flatnonzero(token_slots == slot)
            segments.append((slot, None if len(idx) == len(token_slots)
                             else torch.from_numpy(idx).to(self.device, non_blocking=True)))
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
    def device_slots(self):
        """While CUDA graphs are captured, the layers read each token's slot from the device buffer."""
        self.state.device_slots = True
        try:
            yield
        finally:
            self.state.device_slots = False

"""GPU-side adapter slots: up to `max_loras` adapters stacked per (layer, target).

Adapters are zero-padded to `max_rank` so lower-rank adapters share the stacked tensors
(the padded rows/columns contribute exactly zero). When all slots are taken, the least
recently activated adapter that no running request uses is evicted.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pagedllm.lora.adapter import LoRAAdapter


class LoRASlots:
    """Maps lora_int_id -> slot and owns the stacked A/B tensors the punica ops read."""

    def __init__(self, max_loras: int, max_rank: int, shapes: dict[tuple[int, str], tuple[int, int]],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self._ids: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU order
        self.a = {k: torch.zeros(max_loras, max_rank, i, device=device, dtype=dtype) for k, (i, _) in shapes.items()}
        self.b = {k: torch.zeros(max_loras, o, max_rank, device=device, dtype=dtype) for k, (_, o) in shapes.items()}

    def activate(self, lora_id: int, adapter: LoRAAdapter, in_use: set[int] = frozenset()) -> int:
        """Slot for `lora_id`, copying its weights in (evicting an idle adapter) if needed."""
        if lora_id in self._ids:
            self._ids.move_to_end(lora_id)
            return self._ids[lora_id]
        slot = self._free_slot(in_use)
        for key in self.a:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
        for key, (a, b) in adapter.weights.items():
            if key not in self.a:
                raise ValueError(f"adapter targets {key}, which the model does not have")
            self.a[key][slot, : a.shape[0]].copy_(a)
            self.b[key][slot, :, : b.shape[1]].copy_(b)
        self._ids[lora_id] = slot
        return slot

    def _free_slot(self, in_use: set[int]) -> int:
        taken = set(self._ids.values())
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        for victim in self._ids:
            if victim not in in_use:
                return self._ids.pop(victim)
        raise ValueError(f"all {self.max_loras} LoRA slots are in use (raise --max-loras)")

    def slot_of(self, lora_id: int) -> int:
        """Slot index for a token: -1 for the base model (id 0 / None)."""
        return self._ids[lora_id] if lora_id else -1

"""Device-side adapter slots: up to ``max_loras`` adapters stacked per adapted layer.

One pair of stacked tensors per model layer that LoRA wraps (a fused one holds several
PEFT targets, e.g. q | k | v), so the whole layer's delta is one shrink and one expand:

    a: (max_loras, T * max_rank, in)     target t's A in rows  [t R, t R + r)
    b: (max_loras, out, T * max_rank)    target t's B in its output columns, ranks [t R, t R + r)

(R = max_rank, r = the adapter's rank, T targets). Everything else is zero, so lower ranks,
absent targets and the cross terms between targets contribute exactly nothing. When all
slots are taken, the least recently activated adapter that no request of the step uses
is evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from pagedllm.lora.adapter import LoRAAdapter


@dataclass(frozen=True)
class ModuleTargets:
    """One wrapped layer on this rank: its input size and its PEFT targets as (name, first output column,
    width, first row of the target's B that this rank holds); ``in_start``: the first column of every
    target's A this rank holds (tensor parallel: a column-parallel layer holds some of B's rows, a
    row-parallel one some of A's columns; 0 and everything with one rank)."""

    in_features: int
    targets: tuple[tuple[str, int, int, int], ...]
    in_start: int = 0

    @property
    def out_features(self) -> int:
        return sum(width for _, _, width, _ in self.targets)


class LoRASlots:
    """Maps lora_int_id -> slot and owns the stacked A/B tensors the LoRA layers read."""

    def __init__(self, max_loras: int, max_rank: int, modules: dict[tuple[int, str], ModuleTargets],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self._ids: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU order
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        # (layer, PEFT target) -> (module key, index among its targets, first output column, width, first row
        # of B and first column of A held here)
        self._where: dict[tuple[int, str], tuple[tuple[int, str], int, int, int, int, int]] = {}
        for key, mod in modules.items():
            ranks = len(mod.targets) * max_rank
            self.a[key] = torch.zeros(max_loras, ranks, mod.in_features, device=device, dtype=dtype)
            self.b[key] = torch.zeros(max_loras, mod.out_features, ranks, device=device, dtype=dtype)
            for t, (name, offset, width, out_start) in enumerate(mod.targets):
                self._where[(key[0], name)] = (key, t, offset, width, out_start, mod.in_start)
        self._layers = {key[0] for key in modules}  # pipeline parallel: this stage's layers

    def activate(self, lora_id: int, adapter: LoRAAdapter, in_use: set[int] = frozenset()) -> int:
        """Slot for ``lora_id``, copying its weights in (evicting an idle adapter) if needed."""
        if lora_id in self._ids:
            self._ids.move_to_end(lora_id)
            return self._ids[lora_id]
        slot = self._free_slot(in_use)
        for key in self.a:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
        for (layer, target), (a, b) in adapter.weights.items():
            if layer not in self._layers:
                continue  # another pipeline stage's layer
            where = self._where.get((layer, target))
            if where is None:
                raise ValueError(f"adapter targets {target} of layer {layer}, which the model does not have")
            key, t, offset, width, out_start, in_start = where
            r0, r = t * self.max_rank, a.shape[0]
            self.a[key][slot, r0:r0 + r].copy_(a.narrow(1, in_start, self.a[key].shape[2]))
            self.b[key][slot, offset:offset + width, r0:r0 + r].copy_(b.narrow(0, out_start, width))
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

"""Multi-LoRA support (issue #15): adapter loading and batched LoRA math.

Only the model-independent pieces live here so far: `LoRARequest`, PEFT adapter
loading/validation (`adapter.py`) and the batched shrink/expand ops
(`punica.py`), and the GPU slot table (`slots.py`). Wiring into the model runner, scheduler and server is not done yet.
"""

from pagedllm.lora.adapter import LoRAAdapter, load_peft_adapter
from pagedllm.lora.punica import add_lora, lora_expand, lora_shrink
from pagedllm.lora.request import LoRARequest
from pagedllm.lora.slots import LoRASlots

__all__ = ["LoRAAdapter", "LoRARequest", "LoRASlots", "add_lora", "load_peft_adapter", "lora_expand", "lora_shrink"]

"""Multi-LoRA serving: many PEFT adapters over one base model, mixed in one batch.

    request.py        LoRARequest (which adapter a request runs with; torch-free)
    adapter.py        PEFT adapter directory -> LoRAAdapter (validated, scaling folded into B)
    slots.py          LoRASlots: the stacked per-(layer, target) A/B tensors on the device
    punica.py         batched shrink/expand in torch (per-token slot gather)
    triton_punica.py  the same as one Triton BGMV kernel (GPU, CUDA graphs)
    layers.py         LoRALinear: a model's linear + the delta of each token's adapter
    manager.py        LoRAManager (worker side): loads, caches and activates adapters per step

Only ``LoRARequest`` is imported here, so the engine's torch-free modules can name it.
"""

from pagedllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]

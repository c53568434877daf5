"""`LoRARequest`: names an adapter for one request, as vLLM's `vllm.lora.request.LoRARequest`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with.

    `lora_int_id` is the engine-wide identity (vLLM: must be > 0; 0 means the base model),
    `lora_path` the directory holding `adapter_config.json` + `adapter_model.safetensors`.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError("lora_path must be a non-empty path")

"""The LoRA adapters a server serves by name: ``--lora-modules`` and vLLM's runtime endpoints.

A request's ``model`` field picks an adapter by name (the base model's names run without
one). Each adapter's ``lora_int_id`` is derived from its name and path, so every API
server process (``--api-server-count``) gives the same adapter the same id without
talking to the others. Adapters are checked here (config, rank, shapes against the model)
when they are added, so a bad one is a 400 at load time, never an error inside a step.

Runtime loading (``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``) is off unless
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (vLLM's switch) or ``PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING``
is true. With several API servers a runtime load reaches only the process that answered it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from pagedllm.config import LoRAConfig
from pagedllm.lora.request import LoRARequest


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str


def parse_lora_module(text: str) -> LoRAModulePath:
    """argparse type of ``--lora-modules``: ``name=path`` or vLLM's JSON ``{"name": ..., "path": ...}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules: not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not obj.get("name") or not obj.get("path"):
            raise argparse.ArgumentTypeError('--lora-modules JSON needs "name" and "path"')
        return LoRAModulePath(str(obj["name"]), str(obj["path"]))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules takes name=path, got {text!r}")
    return LoRAModulePath(name, path)


def runtime_updates_allowed() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true")
               for var in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING"))


def lora_int_id(name: str, path: str) -> int:
    """A positive 31-bit id, the same in every process for the same (name, path)."""
    digest = hashlib.blake2b(f"{name}\0{os.path.abspath(path)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1) + 1


class LoRAModules:
    """Adapter name -> LoRARequest, checked against the model when added."""

    def __init__(self, lora_config: LoRAConfig | None, hf_config: Any, base_names: list[str]) -> None:
        self.lora_config = lora_config
        self.hf_config = hf_config
        self.base_names = base_names
        self._by_name: dict[str, LoRARequest] = {}

    @property
    def enabled(self) -> bool:
        return self.lora_config is not None

    def get(self, name: str | None) -> LoRARequest | None:
        return self._by_name.get(name) if name is not None else None

    def __iter__(self):
        return iter(self._by_name.values())

    def add(self, name: str, path: str) -> LoRARequest:
        """Check and register an adapter; ValueError (a 400) if it cannot be served or the name is taken."""
        if self.lora_config is None:
            raise ValueError("LoRA is not enabled on this server (start it with --enable-lora)")
        if not name or not path:
            raise ValueError("lora_name and lora_path must be non-empty")
        if name in self._by_name or name in self.base_names:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        from pagedllm.lora.adapter import adapter_shapes, check_adapter
        from pagedllm.lora.layers import target_shapes

        shapes = adapter_shapes(path, self.lora_config.max_lora_rank)
        check_adapter(shapes, target_shapes(self.hf_config), self.hf_config.num_hidden_layers, path)
        request = LoRARequest(name, lora_int_id(name, path), path)
        self._by_name[name] = request
        return request

    async def add_async(self, name: str, path: str) -> LoRARequest:
        """``add`` off the event loop (it reads the adapter's weights)."""
        return await asyncio.to_thread(self.add, name, path)

    def remove(self, name: str) -> LoRARequest:
        """Forget an adapter by name; KeyError if it is not loaded."""
        if name not in self._by_name:
            raise KeyError(name)
        return self._by_name.pop(name)

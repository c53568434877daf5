"""The attention backend interface.

A model's attention layer hands the backend the new q/k/v of every scheduled
token (a flat, ragged batch: prefill chunks and decodes side by side) plus an
``AttentionMetadata``; the backend writes the new K/V into the paged cache at
``slot_mapping`` and attends, for each sequence, over all its blocks.

    tokens of step:   | seq0 chunk (3) | seq1 decode (1) | seq2 chunk (2) |
    query_start_loc:  0                3                 4                6
    seq_lens:         [ctx0 + 3,        ctx1 + 1,          ctx2 + 2]

KV cache layout, one tensor per layer:
    [num_blocks, 2, block_size, num_kv_heads, head_dim]   (index 0 = K, 1 = V)
A token at position p of a sequence lives in slot
    block_tables[seq][p // block_size] * block_size + p % block_size.
Causality: query token i of sequence s (position seq_lens[s] - q_len + i)
attends to context positions 0 .. that position, inclusive.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, all on the model's device."""

    slot_mapping: torch.Tensor  # (num_tokens,) int64; -1 = do not write (padding)
    block_tables: torch.Tensor  # (num_seqs, max_num_blocks) int32, padded with 0
    seq_lens: torch.Tensor  # (num_seqs,) int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32: cumulative query lengths
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int  # tokens before any padding added for CUDA graphs
    # Host copies, for backends that loop in Python (the torch reference).
    seq_lens_cpu: list[int] | None = None
    query_start_loc_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes K/V into the paged cache and computes attention over it."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        key: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        value: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim)
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        ...


# Backend name -> "module:Class" (imported on first use) or a factory function. Lazy, so
# that this module imports none of its implementations (triton_backend pulls in triton) and
# the implementations need no registration side effect at import.
BackendFactory = Callable[[], AttentionBackend]
_BACKENDS: dict[str, str | BackendFactory] = {
    "torch": "pagedllm.attention.torch_ref:TorchAttentionBackend",
    "cpu_sdpa": "pagedllm.attention.cpu_sdpa:CpuSdpaAttentionBackend",
    "triton": "pagedllm.attention.triton_backend:TritonAttentionBackend",
}


def register_backend(name: str, factory: str | BackendFactory) -> None:
    """Make a backend selectable by name: ``factory`` is "module:Class" or a zero-argument callable."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    """Instantiate a registered backend; 'auto' picks triton on CUDA, cpu_sdpa otherwise."""
    if name == "auto":
        name = "triton" if torch.cuda.is_available() else "cpu_sdpa"
    factory = _BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose from {available_backends()}")
    if isinstance(factory, str):
        module_name, _, class_name = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), class_name)
    return factory()


def kv_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as raw bytes when its dtype is fp8 (``--kv-cache-dtype fp8``): torch's CPU indexing
    kernels (index_copy_, gathers) have no fp8 versions, and moving bytes is all they do."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache


def as_kv_dtype(t: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """``t`` in the cache's dtype, as ``kv_bytes`` stores it (fp8: saturated to +-448, then its bytes)."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        return t.to(torch.float8_e4m3fn).view(torch.uint8)
    return t.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``kv_cache[index]`` (index along blocks), also for an fp8 cache."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        return kv_cache.view(torch.uint8)[index].view(torch.float8_e4m3fn)
    return kv_cache[index]

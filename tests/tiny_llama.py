"""A tiny random Llama checkpoint for engine tests: small enough for the CPU, peaked enough for greedy tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, scale: float = 0.1, num_hidden_layers: int = 2, vocab_size: int = 256):
    """An HF ``LlamaForCausalLM`` (hidden 64, 4 heads / 2 KV heads) with every weight drawn N(0, scale) from
    ``seed``, parameter by parameter in name order (N(0, 0.1): peaked distributions, few near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def save_tiny_llama(path: Path | str, **kwargs) -> str:
    """``tiny_llama(**kwargs)`` saved as an HF checkpoint at ``path``; returns the path."""
    tiny_llama(**kwargs).save_pretrained(path)
    return str(path)

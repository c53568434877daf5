"""Batched LoRA over stacked adapter slots (torch; Punica SGMV/BGMV semantics).

Each token carries a slot index into stacked weights; index -1 means "base model, no delta".
Ranks below the slot rank are zero-padded, so one stacked tensor serves every adapter:

    lora_a: (num_slots, max_rank, in)      lora_b: (num_slots, out, max_rank)
    x: (T, in)  ->  shrink  ->  (T, max_rank)  ->  expand  ->  y += (T, out)
"""

from __future__ import annotations

import torch


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(T, in) x per-token A -> (T, max_rank); rows with slot -1 are zero."""
    valid = slots >= 0
    a = lora_a[slots.clamp(min=0)]  # (T, max_rank, in)
    out = torch.bmm(a, x.unsqueeze(-1)).squeeze(-1)  # (T, max_rank)
    return out * valid.unsqueeze(-1).to(out.dtype)


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor,
                offset: int = 0) -> torch.Tensor:
    """y[:, offset:offset+out] += per-token B @ h; in place, so a merged QKV/gate-up output
    takes each shard's delta at its column offset."""
    valid = slots >= 0
    b = lora_b[slots.clamp(min=0)]  # (T, out, max_rank)
    delta = torch.bmm(b, h.unsqueeze(-1)).squeeze(-1) * valid.unsqueeze(-1).to(h.dtype)
    y[:, offset:offset + delta.shape[1]] += delta.to(y.dtype)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slots: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """y[:, offset:...] += LoRA delta of x for each token's slot (shrink then expand)."""
    return lora_expand(lora_shrink(x, lora_a, slots), lora_b, slots, y, offset)

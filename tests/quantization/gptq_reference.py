"""GPTQ / AWQ checkpoints written from the published formats, independently of pagedllm's code.

The packers place each code bit by bit, as the formats' reference packers do (AutoGPTQ /
GPTQModel ``pack``: ``qweight[i // pack, j] |= q[i, j] << bits * (i % pack)`` and the same along
the columns for ``qzeros``; AutoAWQ ``WQLinear_GEMM.from_linear``: word ``j`` of a row holds
columns ``8 j + [0, 2, 4, 6, 1, 3, 5, 7][k]`` in nibble ``k``), on Python ints turned into int32
words by numpy's uint32 -> int32 view. The quantizer is a plain per-group round-to-nearest with
fp16 scales, whose dequantization ``scale * (q - zero)`` is the reference weight.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Quantized:
    """One layer: codes (K, N), zeros (G, N) as integers, scales (G, N) fp16, g_idx (K,)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """The (N, K) fp32 weight: scale * (q - zero), each input with its group's scale and zero."""
        g = self.g_idx.long()
        return ((self.codes - self.zeros[g]).float() * self.scales.float()[g]).t().contiguous()


def act_order_g_idx(in_size: int, group: int, seed: int) -> torch.Tensor:
    """GPTQ's desc_act: inputs quantized in a permuted order, so input ``perm[i]`` is in group ``i // group``."""
    perm = torch.randperm(in_size, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_size, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_size, dtype=torch.int32) // group
    return g_idx


def quantize(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest of the (N, K) weight ``w`` per group of inputs (``g_idx``: act-order groups)."""
    n, k = w.shape
    maxq = 2**bits - 1
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // group
    wt = w.t().double()
    scales = torch.empty(k // group, n, dtype=torch.float16)
    zeros = torch.empty(k // group, n, dtype=torch.int64)
    for g in range(k // group):
        rows = wt[g_idx == g]
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            scale, zero = torch.maximum(-lo, hi) * 2 / maxq, torch.full((n,), (maxq + 1) // 2)
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale.half().double().clamp(min=1e-4)).long().clamp(0, maxq)
        scales[g] = scale.half().clamp(min=1e-4)
        zeros[g] = zero
    gl = g_idx.long()
    codes = (torch.round(wt / scales.double()[gl]) + zeros[gl]).clamp(0, maxq).long()
    return Quantized(codes, zeros, scales, g_idx.to(torch.int32))


def _words(rows: list[list[int]]) -> torch.Tensor:
    return torch.from_numpy(np.array(rows, dtype=np.uint64).astype(np.uint32).view(np.int32))


def pack_gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) codes -> (K / pack, N) int32: input i of column j in word i // pack at bit bits * (i % pack)."""
    pack, (k, n), q = 32 // bits, codes.shape, codes.tolist()
    words = [[0] * n for _ in range(k // pack)]
    for i in range(k):
        for j in range(n):
            words[i // pack][j] |= (q[i][j] & (2**bits - 1)) << (bits * (i % pack))
    return _words(words)


def pack_gptq_qzeros(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, N) stored zeros -> (G, N / pack) int32: column j in word j // pack at bit bits * (j % pack).
    A v1 checkpoint stores zero - 1 (-1 wraps to all ones, as AutoGPTQ's packer leaves it)."""
    pack, (groups, n), z = 32 // bits, stored.shape, stored.tolist()
    words = [[0] * (n // pack) for _ in range(groups)]
    for g in range(groups):
        for j in range(n):
            words[g][j // pack] |= (z[g][j] & (2**bits - 1)) << (bits * (j % pack))
    return _words(words)


def pack_awq(codes: torch.Tensor, order: tuple[int, ...] = AWQ_PACK_ORDER) -> torch.Tensor:
    """(rows, N) 4-bit codes -> (rows, N / 8) int32: nibble k of word j holds column 8 j + order[k]."""
    rows, n = codes.shape
    q = codes.tolist()
    words = [[0] * (n // 8) for _ in range(rows)]
    for r in range(rows):
        for j in range(n // 8):
            for k in range(8):
                words[r][j] |= q[r][8 * j + order[k]] << (4 * k)
    return _words(words)


def checkpoint_tensors(quant: Quantized, method: str, bits: int, v1: bool,
                       awq_order: tuple[int, ...] = AWQ_PACK_ORDER) -> dict[str, torch.Tensor]:
    """The tensors a GPTQ (``v1``: zeros stored minus one) or AWQ (GEMM) checkpoint holds for one layer."""
    if method == "awq":
        return {"qweight": pack_awq(quant.codes, awq_order), "qzeros": pack_awq(quant.zeros, awq_order),
                "scales": quant.scales}
    return {"qweight": pack_gptq_qweight(quant.codes, bits),
            "qzeros": pack_gptq_qzeros(quant.zeros - (1 if v1 else 0), bits),
            "scales": quant.scales, "g_idx": quant.g_idx}


def quant_config(method: str, bits: int, group: int, v1: bool = True, desc_act: bool = False) -> dict:
    """``quantization_config`` as the quantizers write it into config.json."""
    if method == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": True,
            "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq" if v1 else "gptq_v2"}


def write_checkpoint(model, path: Path, method: str, bits: int, group: int, sym: bool, v1: bool = True,
                     desc_act: bool = False) -> None:
    """Save the HF ``model`` quantized as a GPTQ/AWQ checkpoint at ``path``, and replace each of its linear
    weights by the dequantized reference (so ``model`` then runs exactly the checkpoint's weights)."""
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if module not in LINEARS or not name.endswith(".weight"):
                tensors[name] = p.detach().clone()
                continue
            # Layers of one input (q/k/v, gate/up) get one permutation, as GPTQ's shared Hessian gives them.
            same_input = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            g_idx = act_order_g_idx(p.shape[1], group, seed=zlib.crc32(same_input.encode())) if desc_act else None
            quant = quantize(p, bits, group, sym, g_idx)
            prefix = name[: -len(".weight")]
            for key, t in checkpoint_tensors(quant, method, bits, v1).items():
                tensors[f"{prefix}.{key}"] = t.contiguous()
            p.copy_(quant.dequantized())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quant_config(method, bits, group, v1, desc_act)
    (path / "config.json").write_text(json.dumps(config))

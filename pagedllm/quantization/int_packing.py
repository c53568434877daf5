"""Packed integer weights as GPTQ and AWQ checkpoints store them, and round-to-nearest quantization.

Both formats keep ``bits``-wide codes in int32 words, ``pack = 32 // bits`` codes a word, low bits first,
and dequantize per group of ``group_size`` inputs as ``w[o, i] = scale[g, o] * (q[i, o] - zero[g, o])``:

    gptq qweight (input / pack, output)  input i of column o: word (i // pack, o), bits b * (i % pack) ..
         qzeros  (groups, output / pack) group g of column o: word (g, o // pack), bits b * (o % pack) ..
         g_idx   (input,)                the group of each input (act-order checkpoints permute them)
         checkpoint_format "gptq" (v1) stores ``zero - 1``; "gptq_v2" stores the zero itself
    awq  qweight (input, output / 8)     4 bits; nibble k of word (i, j) holds column 8 j + AWQ_ORDER[k]
         qzeros  (groups, output / 8)    the same interleaving; the zero itself

(AutoGPTQ / GPTQModel ``pack``; AutoAWQ ``WQLinear_GEMM.from_linear``). Codes are returned as
(input, output) int32, the layout every caller works in.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds column AWQ_ORDER[k] of its 8
_AWQ_INVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c sits in nibble _AWQ_INVERSE[c]


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, device=device, dtype=torch.int32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are summed in int64 as unsigned 32-bit values; wrap the top bit into int32's sign.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> (rows / pack, cols) int32, packed along the rows (GPTQ qweight)."""
    pack = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0] // pack, pack, q.shape[1])
    return _to_int32((q << _shifts(bits, q.device).view(1, pack, 1).long()).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight (rows / pack, cols) -> (rows, cols) int32 codes."""
    pack = 32 // bits
    q = (words.unsqueeze(1) >> _shifts(bits, words.device).view(1, pack, 1)) & ((1 << bits) - 1)
    return q.reshape(words.shape[0] * pack, words.shape[1])


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> (rows, cols / pack) int32, packed along the columns (GPTQ qzeros)."""
    pack = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0], q.shape[1] // pack, pack)
    return _to_int32((q << _shifts(bits, q.device).view(1, 1, pack).long()).sum(dim=2))


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qzeros (rows, cols / pack) -> (rows, cols) int32 codes."""
    pack = 32 // bits
    q = (words.unsqueeze(2) >> _shifts(bits, words.device).view(1, 1, pack)) & ((1 << bits) - 1)
    return q.reshape(words.shape[0], words.shape[1] * pack)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) 4-bit codes -> AWQ (rows, cols / 8) int32, the 8 columns of a word interleaved."""
    interleaved = q.reshape(q.shape[0], q.shape[1] // 8, 8)[:, :, list(AWQ_ORDER)]
    return pack_cols(interleaved.reshape(q.shape), 4)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AWQ qweight or qzeros (rows, cols / 8) -> (rows, cols) int32 codes in column order."""
    nibbles = unpack_cols(words, 4).reshape(words.shape[0], words.shape[1], 8)
    return nibbles[:, :, list(_AWQ_INVERSE)].reshape(words.shape[0], words.shape[1] * 8)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest per group of inputs: (output, input) float -> codes (input, output) int32 and
    scales, zeros (groups, output) float32, so that ``w[o, i] ~= scales[g, o] * (codes[i, o] - zeros[g, o])``.
    ``sym``: zero ``2 ** (bits - 1)`` (GPTQ's symmetric mode); else the zero that makes 0.0 exact."""
    maxq = (1 << bits) - 1
    out_size, in_size = weight.shape
    w = weight.float().t().reshape(in_size // group_size, group_size, out_size)
    if sym:
        scales = (w.abs().amax(dim=1) * 2 / maxq).clamp_min(1e-10)
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(dim=1).clamp_max(0), w.amax(dim=1).clamp_min(0)
        scales = ((hi - lo) / maxq).clamp_min(1e-10)
        zeros = torch.round(-lo / scales).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scales.unsqueeze(1)) + zeros.unsqueeze(1), 0, maxq)
    return codes.reshape(in_size, out_size).to(torch.int32), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """(input, output) codes, (groups, output) scales and zeros, the group of each input -> the
    (output, input) weight in the scales' dtype; ``(codes - zero)`` is exact, one rounding in the product."""
    groups = g_idx.long()
    w = (codes.to(scales.dtype) - zeros.index_select(0, groups)) * scales.index_select(0, groups)
    return w.t()

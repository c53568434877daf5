"""Dequantizing GGUF tensors: the common llama.cpp block formats over whole tensors, the rest through gguf.

gguf's numpy code splits a tensor into groups of rows and loops over them; Q4_0,
Q4_1, Q4_K and Q8_0 are done here over whole rows (chunks of them), with the same
float32 arithmetic (bit for bit: tests/test_startup.py, tests/loader/test_gguf_int4.py).
numpy, not torch: a torch thread pool on a busy 2-core machine spins instead of
working (25x slower measured). Other types go to ``gguf.dequantize``.

    Q4_0  [d f16 | 16 B nibbles]            x = (q - 8) * d      q: low nibbles are elements 0..15,
    Q4_1  [d f16 | m f16 | 16 B nibbles]    x = q * d + m           high nibbles elements 16..31
    Q8_0  [d f16 | 32 x int8]               x = q * d

The 4-bit types are decoded once, into ``int4_parts``: codes, and per group of 32
a scale and a low end, ``x = codes * scale + low`` (Q4_0: low = -8 d; both forms are
exact in float32). ``dequantize`` multiplies them out; the int4 paths keep the
codes (``quantization/cpu_bf16.py``, ``--quantization gguf``). Q4_K (llama.cpp's
k-quants, ``block_q4_K``, 256 values, 144 bytes):

    [d f16 | dmin f16 | scales 12 B: eight 6-bit (sc, m) | 128 B nibbles]
    sub-block j of 32: x = (d * sc_j) * q - dmin * m_j; bytes 32i..32i+31 hold sub-block 2i in their low
    nibbles and 2i+1 in their high ones; (sc, m)_j for j < 4: scales[j] & 63, scales[j+4] & 63; else
    scales[j+4] & 15 | (scales[j-4] >> 6) << 4, scales[j+4] >> 4 | (scales[j] >> 6) << 4
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

# A float tensor from a 4-bit GGUF matrix may carry its codes as this attribute (``int4_parts``'s three arrays as
# torch tensors; gguf_loader.iter_gguf_weights with int4_codes=True): ``codes * scale + low`` == the tensor.
INT4_CODES = "gguf_int4_codes"

# Rows dequantized per pass: the temporaries of a pass (a few float32 copies) stay ~4 MB, not a few times the
# tensor (the 113 MB float32 embedding of SmolLM2 made the load's memory peak).
_CHUNK_ELEMENTS = 1 << 20


def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 ``(rows, elements per row)`` from uint8 ``(rows, bytes per row)`` of GGML type ``qtype``."""
    if qtype.name not in _TYPE_SIZES:
        from gguf import dequantize as gguf_dequantize

        return gguf_dequantize(data, qtype)
    out = np.empty((data.shape[0], data.shape[1] // _TYPE_SIZES[qtype.name] * _VALUES[qtype.name]), np.float32)
    for rows, blocks in _row_chunks(data, qtype.name, out.shape[1]):
        if qtype.name == "Q8_0":
            out[rows] = _q8_0(blocks).reshape(-1, out.shape[1])
            continue
        codes, scale, low = _INT4[qtype.name](blocks)
        n = codes.shape[0]
        groups = codes.reshape(n, -1, 32).astype(np.float32) * scale.reshape(n, -1, 1) + low.reshape(n, -1, 1)
        out[rows] = groups.reshape(n, -1)
    return out


def int4_parts(data: np.ndarray, qtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes uint8 (rows, k) in 0..15, scale (rows, k / 32), low (rows, k / 32) float32) with
    ``codes * scale + low`` equal to ``dequantize`` bit for bit, for Q4_0, Q4_1 and Q4_K; None for other types."""
    name = qtype.name
    if name not in _INT4:
        return None
    k = data.shape[1] // _TYPE_SIZES[name] * _VALUES[name]
    codes = np.empty((data.shape[0], k), np.uint8)
    scale, low = (np.empty((data.shape[0], k // 32), np.float32) for _ in range(2))
    for rows, blocks in _row_chunks(data, name, k):
        c, s, lo = _INT4[name](blocks)  # (rows, blocks, values), (rows, blocks, groups) x 2
        n = c.shape[0]
        codes[rows], scale[rows], low[rows] = c.reshape(n, -1), s.reshape(n, -1), lo.reshape(n, -1)
    return codes, scale, low


def _row_chunks(data: np.ndarray, name: str, elements: int) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, their blocks (rows, blocks, bytes per block)) for passes of about ``_CHUNK_ELEMENTS`` values."""
    blocks = data.reshape(data.shape[0], -1, _TYPE_SIZES[name])
    step = max(1, _CHUNK_ELEMENTS // elements)
    for start in range(0, data.shape[0], step):
        yield slice(start, start + step), blocks[start:start + step]


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at bytes ``start:start+2`` of each block, as float32 (rows, blocks, 1)."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, blocks, 16) packed bytes -> (rows, blocks, 32) values 0..15: low nibbles first, then high."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32) * _scale(blocks, 0)


_TYPE_SIZES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}  # bytes per block
_VALUES = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256}  # values per block


def _q4_0_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _scale(blocks, 0)
    return _nibbles(blocks[..., 2:]), d, -8 * d  # (q - 8) * d == q * d - 8 d: both exact in float32


def _q4_1_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(blocks[..., 4:]), _scale(blocks, 0), _scale(blocks, 2)


def _q4_k_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _scale(blocks, 0), _scale(blocks, 2)  # (rows, blocks, 1)
    sc = blocks[..., 4:16]
    low6 = np.uint8(63)
    scales = np.concatenate([sc[..., 0:4] & low6, (sc[..., 8:12] & np.uint8(15)) | ((sc[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([sc[..., 4:8] & low6, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], -1)
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 32)  # 4 x 32 bytes: sub-blocks (2i, 2i + 1)
    codes = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-2)  # (rows, blocks, 4, 2, 32)
    return (codes.reshape(*blocks.shape[:-1], 256), d * scales.astype(np.float32),
            -(dmin * mins.astype(np.float32)))


_INT4 = {"Q4_0": _q4_0_parts, "Q4_1": _q4_1_parts, "Q4_K": _q4_k_parts}
INT4_TYPES = frozenset(_INT4)

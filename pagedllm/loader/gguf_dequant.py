"""Dequantizing GGUF tensors: the common llama.cpp block formats over whole tensors, the rest through gguf.

gguf's numpy code splits a tensor into groups of rows and loops over them; Q4_0,
Q4_1 and Q8_0 are done here over whole rows (chunks of them), with the same float32
arithmetic (bit for bit: tests/test_startup.py checks it). numpy, not torch: a
torch thread pool on a busy 2-core machine spins instead of working (25x slower
measured). Other types go to ``gguf.dequantize``.

    Q4_0  [d f16 | 16 B nibbles]            x = (q - 8) * d      q: low nibbles are elements 0..15,
    Q4_1  [d f16 | m f16 | 16 B nibbles]    x = q * d + m           high nibbles elements 16..31
    Q8_0  [d f16 | 32 x int8]               x = q * d
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Rows dequantized per pass: the temporaries of a pass (a few float32 copies) stay ~4 MB, not a few times the
# tensor (the 113 MB float32 embedding of SmolLM2 made the load's memory peak).
_CHUNK_ELEMENTS = 1 << 20


def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 ``(rows, elements per row)`` from uint8 ``(rows, bytes per row)`` of GGML type ``qtype``."""
    fast = _FAST.get(qtype.name)
    if fast is None:
        from gguf import dequantize as gguf_dequantize

        return gguf_dequantize(data, qtype)
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, _TYPE_SIZES[qtype.name])  # (rows, blocks, bytes per block)
    out = np.empty((rows, blocks.shape[1] * 32), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // out.shape[1])
    for start in range(0, rows, step):
        out[start:start + step] = fast(blocks[start:start + step]).reshape(-1, out.shape[1])
    return out


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at bytes ``start:start+2`` of each block, as float32 (rows, blocks, 1)."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(rows, blocks, 16) packed bytes -> (rows, blocks, 32) values 0..15: low nibbles first, then high."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * (_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * _nibbles(blocks[..., 4:]).astype(np.float32) + _scale(blocks, 2)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32) * _scale(blocks, 0)


_FAST = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}
_TYPE_SIZES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}

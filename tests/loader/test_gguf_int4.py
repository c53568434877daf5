"""A GGUF's 4-bit matrices served from their own codes on the CPU (Q4_0, Q4_1, Q4_K).

The reference is the gguf package's dequantization: ``int4_parts`` must give codes, scales and offsets whose
``codes * scale + low`` is that dequantization bit for bit (Q4_K blocks come from a packer written from ggml's
block_q4_K layout, tests/loader/gguf_writer.py, itself checked against gguf). A tiny Llama written with 4-bit
linears must then multiply by exactly those values in decode steps (q/k rows un-permuted like the floats).
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import load_model
from pagedllm.loader.gguf_dequant import INT4_TYPES, int4_parts
from pagedllm.quantization.base import step_shape
from tests.loader.gguf_writer import quantize, write_gguf
from tests.loader.test_gguf_loader import random_hf_model

Q = gguf.GGMLQuantizationType
FOUR_BIT = [Q.Q4_0, Q.Q4_1, Q.Q4_K]


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=lambda t: t.name)
def test_int4_parts_are_the_reference_dequantization(qtype):
    w = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32) * 0.05
    w[0, :40] += 1.0  # an outlying block
    packed = quantize(w, qtype)
    ref = gguf.dequantize(packed, qtype).reshape(16, 512)
    assert np.abs(ref - w).max() < 0.08  # within half a step of the outlying block (Q4_K: our own packer)
    codes, scale, low = int4_parts(packed, qtype)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and scale.shape == low.shape == (16, 512 // 32)
    rebuilt = (codes.reshape(16, -1, 32).astype(np.float32) * scale[..., None] + low[..., None]).reshape(16, 512)
    assert np.array_equal(rebuilt, ref)
    assert len(np.unique(codes)) == 16


def test_other_types_have_no_int4_parts():
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    assert int4_parts(quantize(w, Q.Q8_0), Q.Q8_0) is None
    assert {t.name for t in FOUR_BIT} == INT4_TYPES


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=lambda t: t.name)
def test_tiny_llama_decode_steps_multiply_by_the_files_codes(tmp_path, qtype):
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_model = random_hf_model(config)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_model, "llama", linear_type=qtype)
    fast = load_model(ModelConfig(model=str(path), quantization="cpu_bf16"), torch.device("cpu"),
                      get_backend("cpu_sdpa"))
    exact = load_model(ModelConfig(model=str(path), dtype="float32"), torch.device("cpu"), get_backend("torch"))
    fast_linears = {n: m for n, m in fast.named_modules() if hasattr(m, "int4_weight")}
    assert len(fast_linears) == 4 * config.num_hidden_layers
    assert all(m.int4_weight is not None for m in fast_linears.values())
    exact_modules = dict(exact.named_modules())
    for name, layer in fast_linears.items():
        weight = exact_modules[name].weight  # the file's values, dequantized in fp32 (q/k rows un-permuted)
        eye = torch.eye(weight.shape[1])
        with step_shape(num_seqs=1, decoding=True):  # a decode step: the int4 codes
            columns = layer(eye)
        with step_shape(num_seqs=1, decoding=False):  # a prompt: the bf16 copy
            rounded = layer(eye)
        # int4: scale and zero point rounded to bf16, then the output; far closer than the bf16 copy's rounding
        # of each weight would be if the codes were wrong.
        torch.testing.assert_close(columns, weight.T, rtol=2e-2, atol=2e-3)
        assert torch.equal(rounded, weight.T.bfloat16().float())
        assert not torch.equal(columns, rounded)

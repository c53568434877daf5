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


# ---- --quantization gguf: the packed 4-bit layout (gptq.py) filled from the file's codes ---------------------
def _tiny_llama(tmp_path, qtype, name="tiny.gguf"):
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    path = tmp_path / name
    write_gguf(path, random_hf_model(config), "llama", linear_type=qtype)
    return path


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=lambda t: t.name)
def test_quantization_gguf_keeps_the_files_weights(tmp_path, qtype):
    from tests.models.paged_driver import PagedDriver

    path = _tiny_llama(tmp_path, qtype)
    packed_config = ModelConfig(model=str(path), dtype="float32", quantization="gguf")
    packed = load_model(packed_config, torch.device("cpu"), get_backend("torch"))
    exact = load_model(ModelConfig(model=str(path), dtype="float32"), torch.device("cpu"), get_backend("torch"))
    exact_modules = dict(exact.named_modules())
    layers = {n: m for n, m in packed.named_modules() if hasattr(m, "qweight")}
    assert len(layers) == 4 * 2
    for name, layer in layers.items():
        weight = layer.quant_method.dequantized_weight(layer)
        assert layer.qweight.dtype == torch.int32 and layer.qweight.numel() * 8 == weight.numel()  # 4 bits each
        torch.testing.assert_close(weight, exact_modules[name].weight, rtol=1e-6, atol=1e-7)
    prompts = [[3, 14, 15, 92, 65, 35], list(range(40, 53))]
    ours = PagedDriver(packed, packed_config.hf_config, block_size=4, num_blocks=32).step(list(enumerate(prompts)))
    ref = PagedDriver(exact, packed_config.hf_config, block_size=4, num_blocks=32).step(list(enumerate(prompts)))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_quantization_gguf_refuses_what_it_cannot_keep(tmp_path):
    path = _tiny_llama(tmp_path, Q.Q8_0, "q8.gguf")
    with pytest.raises(ValueError, match="Q8_0, which have no 4-bit form"):
        load_model(ModelConfig(model=str(path), quantization="gguf"), torch.device("cpu"), get_backend("torch"))
    float_dir = tmp_path / "hf"
    random_hf_model(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2)).save_pretrained(float_dir)
    with pytest.raises(ValueError, match="quantization gguf needs a GGUF file"):
        load_model(ModelConfig(model=str(float_dir), quantization="gguf"), torch.device("cpu"),
                   get_backend("torch"))


def test_a_block_of_scale_zero_stays_exact():
    from pagedllm.loader.gguf_dequant import INT4_CODES
    from pagedllm.models.layers.linear import RowParallelLinear
    from pagedllm.quantization import get_quantization_config

    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32) * 0.1
    w[5, :32] = 0.25  # a constant block: Q4_1 stores d = 0, m = 0.25
    packed = quantize(w, Q.Q4_1)
    codes = packed.reshape(32, 2, 20).copy()
    codes[5, 0, 4:] = 0x5A  # codes the file would not write there; with d = 0 they must not matter
    ref = torch.from_numpy(gguf.dequantize(codes.reshape(32, 40), Q.Q4_1).reshape(32, 64))
    assert torch.all(ref[5, :32] == ref[5, 0])
    tensor = ref.clone()
    setattr(tensor, INT4_CODES, tuple(torch.from_numpy(p) for p in int4_parts(codes.reshape(32, 40), Q.Q4_1)))
    with torch.device("cpu"):
        layer = RowParallelLinear(64, 32, quant_config=get_quantization_config("gguf"))
    layer.weight.weight_loader(layer.weight, tensor)
    torch.testing.assert_close(layer.quant_method.dequantized_weight(layer), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 5, 40])  # the in-kernel GEMM (<= 16 rows) and dequantize + cuBLAS
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K], ids=lambda t: t.name)
def test_quantization_gguf_on_the_gpu(tmp_path, rows, qtype):
    path = str(_tiny_llama(tmp_path, qtype))
    packed = load_model(ModelConfig(model=path, dtype="bfloat16", quantization="gguf"), torch.device("cuda"),
                        get_backend("triton"))
    exact = dict(load_model(ModelConfig(model=path, dtype="float32"), torch.device("cpu"),
                            get_backend("torch")).named_modules())
    layers = {n: m for n, m in packed.named_modules() if hasattr(m, "qweight")}
    assert len(layers) == 4 * 2
    gen = torch.Generator().manual_seed(rows)
    for name, layer in layers.items():
        weight = exact[name].weight
        x = torch.randn(rows, weight.shape[1], generator=gen).bfloat16()
        y = layer(x.cuda()).float().cpu()
        ref = x.float() @ weight.t()
        torch.testing.assert_close(y, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)

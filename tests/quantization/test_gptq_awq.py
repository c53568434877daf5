"""gptq / awq: packed 4/8-bit weights quantized at load (round-to-nearest per group).

Oracles: the packed words are decoded by an element-by-element reading of the
published layouts (AutoGPTQ: codes packed along the input, low bits first; AutoAWQ
GEMM: 8 columns per word in the order 0 2 4 6 1 3 5 7); a layer's output equals
x @ dequantized_weight^T; a tiny Llama served with --quantization gptq|awq gives greedy
tokens identical to the same model saved with its weights replaced by the dequantized ones.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams, quantization
from pagedllm.models.layers.linear import QKVParallelLinear
from pagedllm.quantization.gptq import pack_awq, pack_gptq, quantize_rtn, unpack_awq, unpack_gptq


def _spec_unpack_gptq(qweight: torch.Tensor, bits: int) -> list[list[int]]:
    pack, rows, cols = 32 // bits, qweight.shape[0] * (32 // bits), qweight.shape[1]
    words = [[int(w) & 0xFFFFFFFF for w in row] for row in qweight.tolist()]
    return [[(words[i // pack][j] >> (bits * (i % pack))) & ((1 << bits) - 1) for j in range(cols)]
            for i in range(rows)]


def _spec_unpack_awq(qweight: torch.Tensor) -> list[list[int]]:
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = []
    for row in qweight.tolist():
        cols = [0] * (len(row) * 8)
        for j, word in enumerate(row):
            for k in range(8):
                cols[8 * j + order[k]] = ((word & 0xFFFFFFFF) >> (4 * k)) & 0xF
        out.append(cols)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_matches_the_published_layout(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (32, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    qweight = pack_gptq(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (32 * bits // 32, 5)
    assert _spec_unpack_gptq(qweight, bits) == codes.tolist()
    assert torch.equal(unpack_gptq(qweight, bits), codes)


def test_awq_packing_matches_the_published_layout() -> None:
    codes = torch.randint(0, 16, (6, 24), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    qweight = pack_awq(codes)
    assert qweight.shape == (6, 3)
    assert _spec_unpack_awq(qweight) == codes.tolist()
    assert torch.equal(unpack_awq(qweight), codes)
    assert not torch.equal(qweight, pack_gptq(codes.t().contiguous(), 4).t())  # interleaving is not GPTQ's order


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_half_a_step(sym: bool) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    codes, scales, zeros = quantize_rtn(w, 4, 32, sym)
    deq = ((codes.view(2, 32, 16) - zeros.unsqueeze(1)) * scales.unsqueeze(1)).reshape(64, 16).t()
    step = scales.repeat_interleave(32, dim=0).t()
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (codes >= 0).all() and (codes <= 15).all()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_fused_layer_matches_its_dequantized_weight(method: str) -> None:
    config = quantization.get_quantization_config(method, {"bits": 4, "group_size": 16})
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n * 8, 32, generator=gen) for n in (4, 2, 2))
    layer = QKVParallelLinear(32, 8, 4, 2, quant_config=config)
    for shard_id, tensor in {"q": q, "k": k, "v": v}.items():
        layer.weight.weight_loader(layer.weight, tensor, shard_id)
    x = torch.randn(3, 32, generator=gen)
    deq = layer.quant_method.dequantized_weight(layer)
    torch.testing.assert_close(layer(x), x @ deq.t())
    dense = torch.cat([q, k, v])
    assert (deq - dense).abs().max() <= 2 * dense.abs().max() / 15  # RTN 4-bit: within a step
    assert layer.weight.dtype == torch.int32


@pytest.mark.parametrize(("method", "cfg", "field"), [
    ("gptq", {"bits": 3}, "bits"), ("awq", {"bits": 8}, "bits"), ("gptq", {"group_size": 0}, "group_size"),
    ("gptq", {"desc_act": True}, "desc_act"), ("gptq", {"quant_method": "gptq"}, "not supported yet"),
    ("awq", {"quant_method": "awq"}, "not supported yet"),
])
def test_bad_configs_are_value_errors(method: str, cfg: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        quantization.get_quantization_config(method, cfg)


def test_group_size_not_dividing_is_a_value_error() -> None:
    config = quantization.get_quantization_config("gptq", {"group_size": 24})
    with pytest.raises(ValueError, match="group_size 24"):
        QKVParallelLinear(32, 8, 4, 2, quant_config=config)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path_factory.mktemp("tiny_llama_q4")
    model.save_pretrained(path / "float")
    with torch.no_grad():  # the reference: every linear weight replaced by its RTN dequantization
        for name, p in model.named_parameters():
            if "proj" in name and name.endswith("weight"):
                codes, scales, zeros = quantize_rtn(p, 4, 64, sym=True)  # gptq default: sym
                deq = (codes.view(-1, 64, p.shape[0]) - zeros.unsqueeze(1)) * scales.unsqueeze(1)
                p.copy_(deq.reshape(-1, p.shape[0]).t())
    model.save_pretrained(path / "deq_sym")
    return str(path)


@pytest.mark.parametrize("method", ["gptq"])
def test_tiny_model_greedy_matches_dequantized_float(tiny_dir: str, method: str) -> None:
    prompts = [[1, 5, 9, 77, 3], [1, 200, 100, 50]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    kwargs = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, block_size=16, max_model_len=128,
                  cpu_kv_cache_gib=0.01)
    quantized = LLM(f"{tiny_dir}/float", quantization=method, **kwargs).generate(
        [{"prompt_token_ids": p} for p in prompts], params)
    reference = LLM(f"{tiny_dir}/deq_sym", **kwargs).generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in quantized] == [o.outputs[0].token_ids for o in reference]


def test_dummy_weights_load_quantized(tiny_dir: str) -> None:
    """load_format=dummy (the GPU benchmark's setting) fills packed codes with random bits around the zero."""
    llm = LLM(f"{tiny_dir}/float", quantization="awq", load_format="dummy", device="cpu", dtype="float32",
              skip_tokenizer_init=True, block_size=16, max_model_len=64, cpu_kv_cache_gib=0.01)
    layer = llm.engine.executor.worker.model_runner.model.model.layers[0].mlp.down_proj
    weight = layer.quant_method.dequantized_weight(layer)
    assert weight.abs().max() <= 0.02 + 1e-6 and weight.std() > 0.005
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3

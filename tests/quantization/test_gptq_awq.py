"""gptq / awq: GPTQ and AWQ checkpoints, and 4-bit round-to-nearest at load.

Oracles (gptq_reference.py, written from the formats and not from pagedllm's code):
- checkpoint tensors packed bit by bit per the published layouts load into a fused layer whose
  weight is exactly ``scale * (q - zero)`` of the reference codes: GPTQ 4/8-bit, act-order g_idx,
  v1 (zeros stored minus one) and v2; AWQ's interleaved columns;
- negative controls: AWQ words packed in plain column order, or a v1 checkpoint declared v2,
  give a different weight;
- a tiny Llama saved as a GPTQ/AWQ checkpoint loads by itself (config.json's quantization_config)
  and its greedy tokens equal HF transformers running the dequantized weights (fp32);
- at load (``--quantization gptq|awq`` on a float checkpoint): the packed words decode per the
  layouts, RTN is within half a step, and greedy tokens equal the dequantized float model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, quantization
from pagedllm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from pagedllm.quantization.int_packing import pack_awq, pack_rows, quantize_rtn, unpack_awq, unpack_rows
from tests.quantization import gptq_reference as ref
from tests.quantization.test_w8a8 import PROMPTS, _greedy, _greedy_hf
from tests.tiny_llama import tiny_llama

GATE, UP, K_IN = 64, 32, 128  # a gate_up layer: two shards of 64 and 32 outputs over 128 inputs


def _fused_layer(method: str, bits: int, group: int, shards: list[dict[str, torch.Tensor]],
                 **cfg) -> MergedColumnParallelLinear:
    hf_cfg = ref.quant_config(method, bits, group, **cfg)
    layer = MergedColumnParallelLinear(K_IN, [GATE, UP], quant_config=quantization.get_quantization_config(
        method, hf_cfg))
    for shard_id, tensors in enumerate(shards):
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, shard_id)
    return layer


def _random_layer(bits: int, group: int, seed: int, sym: bool = False, act_order: bool = False,
                  n: int = GATE, g_seed: int | None = None) -> ref.Quantized:
    w = torch.randn(n, K_IN, generator=torch.Generator().manual_seed(seed))
    g_idx = ref.act_order_g_idx(K_IN, group, seed if g_seed is None else g_seed) if act_order else None
    return ref.quantize(w, bits, group, sym, g_idx)


@pytest.mark.parametrize(("bits", "v1", "act_order"), [(4, True, False), (4, True, True), (4, False, True),
                                                      (8, True, False), (8, False, False)])
def test_gptq_checkpoint_loads_to_the_reference_weight_exactly(bits: int, v1: bool, act_order: bool) -> None:
    # Fused shards share their input, so GPTQ gives them one act-order permutation (one seed).
    shards = [_random_layer(bits, 32, seed, act_order=act_order, n=n, g_seed=1) for seed, n in ((1, GATE), (2, UP))]
    layer = _fused_layer("gptq", bits, 32, [ref.checkpoint_tensors(q, "gptq", bits, v1) for q in shards],
                         v1=v1, desc_act=act_order)
    want = torch.cat([q.dequantized() for q in shards])
    assert torch.equal(layer.quant_method.dequantized_weight(layer), want)
    assert layer.act_order == act_order
    x = torch.randn(3, K_IN, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ want.t())


def test_awq_checkpoint_loads_to_the_reference_weight_exactly() -> None:
    shards = [_random_layer(4, 32, seed, n=n) for seed, n in ((3, GATE), (4, UP))]
    assert any((q.zeros != q.zeros[0, 0]).any() for q in shards)  # zero points vary: their order matters
    layer = _fused_layer("awq", 4, 32, [ref.checkpoint_tensors(q, "awq", 4, v1=False) for q in shards])
    assert torch.equal(layer.quant_method.dequantized_weight(layer), torch.cat([q.dequantized() for q in shards]))


def test_awq_in_plain_column_order_gives_a_different_weight() -> None:
    """Negative control: the same codes packed without AWQ's interleaving do not load as the reference."""
    shards = [_random_layer(4, 32, seed, n=n) for seed, n in ((3, GATE), (4, UP))]
    plain = tuple(range(8))
    tensors = [ref.checkpoint_tensors(q, "awq", 4, v1=False, awq_order=plain) for q in shards]
    layer = _fused_layer("awq", 4, 32, tensors)
    assert not torch.equal(layer.quant_method.dequantized_weight(layer), torch.cat([q.dequantized() for q in shards]))


def test_gptq_v1_and_v2_zero_conventions() -> None:
    """v1 stores zero - 1 and v2 the zero: the same tensors read under the other convention are off by one
    zero (one scale); a v1 stored all-ones nibble (zero 0 saved as -1) reads as 16, as AutoGPTQ reads it."""
    quant = _random_layer(4, 32, 5, n=GATE + UP)
    one = ref.Quantized(quant.codes[:, :GATE], quant.zeros[:, :GATE], quant.scales[:, :GATE], quant.g_idx)
    two = ref.Quantized(quant.codes[:, GATE:], quant.zeros[:, GATE:], quant.scales[:, GATE:], quant.g_idx)
    want = torch.cat([one.dequantized(), two.dequantized()])
    v1_tensors = [ref.checkpoint_tensors(q, "gptq", 4, v1=True) for q in (one, two)]
    as_v1 = _fused_layer("gptq", 4, 32, v1_tensors, v1=True)
    as_v2 = _fused_layer("gptq", 4, 32, v1_tensors, v1=False)
    assert torch.equal(as_v1.quant_method.dequantized_weight(as_v1), want)
    off_by_one = as_v2.quant_method.dequantized_weight(as_v2) - want  # the zero one lower: + one scale
    scales = torch.cat([one.scales, two.scales], dim=1).float()[quant.g_idx.long()].t()
    torch.testing.assert_close(off_by_one, scales)

    zero0 = ref.Quantized(one.codes, torch.zeros_like(one.zeros), one.scales, one.g_idx)
    layer = _fused_layer("gptq", 4, 32, [ref.checkpoint_tensors(q, "gptq", 4, v1=True) for q in (zero0, two)])
    assert (layer.qzeros[:, :GATE] == 16).all()


def test_fused_shards_with_different_g_idx_are_refused() -> None:
    one = _random_layer(4, 32, 6, act_order=True, n=GATE)
    two = _random_layer(4, 32, 7, act_order=True, n=UP)
    assert not torch.equal(one.g_idx, two.g_idx)
    with pytest.raises(ValueError, match="g_idx differs"):
        _fused_layer("gptq", 4, 32, [ref.checkpoint_tensors(q, "gptq", 4, True) for q in (one, two)], desc_act=True)


def test_tensors_of_another_group_size_or_bits_are_value_errors() -> None:
    quant = _random_layer(4, 64, 8, n=GATE)
    with pytest.raises(ValueError, match=r"(qzeros|scales) of shape \(2, 64\).*group_size"):
        _fused_layer("gptq", 4, 32, [ref.checkpoint_tensors(quant, "gptq", 4, True)])
    with pytest.raises(ValueError, match="qweight of shape"):
        _fused_layer("gptq", 8, 64, [ref.checkpoint_tensors(quant, "gptq", 4, True)])


@pytest.mark.parametrize(("method", "bits", "v1", "desc_act"), [
    ("gptq", 4, True, True), ("gptq", 8, False, False), ("awq", 4, False, False)])
def test_checkpoint_greedy_matches_hf_on_the_dequantized_weights(
    tmp_path: Path, method: str, bits: int, v1: bool, desc_act: bool,
) -> None:
    model = tiny_llama()
    ref.write_checkpoint(model, tmp_path, method, bits, group=32, sym=method == "gptq" and v1, v1=v1,
                         desc_act=desc_act)
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128)
    qkv = llm.engine.executor.worker.model_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == torch.int32 and qkv.act_order == desc_act
    assert torch.equal(qkv.quant_method.dequantized_weight(qkv), torch.cat(
        [model.model.layers[0].self_attn.get_submodule(p).weight for p in ("q_proj", "k_proj", "v_proj")]))
    assert _greedy(llm, PROMPTS, 20) == _greedy_hf(model, PROMPTS, 20)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "v1", "desc_act"), [("gptq", True, True), ("awq", False, False)])
def test_checkpoint_on_the_gpu_greedy_matches_hf(tmp_path: Path, method: str, v1: bool, desc_act: bool) -> None:
    """The Triton kernels (decode: in-kernel GEMM; prefill over 16 tokens: dequantize + cuBLAS) in fp32."""
    model = tiny_llama()
    ref.write_checkpoint(model, tmp_path, method, 4, group=32, sym=v1, v1=v1, desc_act=desc_act)
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=128)
    assert _greedy(llm, PROMPTS, 20) == _greedy_hf(model, PROMPTS, 20)


def test_checkpoint_with_the_method_named_and_with_another_method(tmp_path: Path) -> None:
    ref.write_checkpoint(tiny_llama(), tmp_path, "awq", 4, group=32, sym=False)
    kwargs = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    llm = LLM(str(tmp_path), quantization="awq", **kwargs)
    assert len(_greedy(llm, PROMPTS[:1], 3)[0]) == 3
    with pytest.raises(ValueError, match="quantization=gptq cannot load a checkpoint whose quant_method is 'awq'"):
        LLM(str(tmp_path), quantization="gptq", **kwargs)


@pytest.mark.parametrize(("method", "cfg", "field"), [
    ("gptq", {"bits": 3}, "bits"), ("gptq", {"bits": 2}, "bits"), ("awq", {"bits": 8}, "bits"),
    ("gptq", {"group_size": 0}, "group_size"), ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format"),
    ("gptq", {"pack_dtype": "int16"}, "pack_dtype"), ("gptq", {"lm_head": True}, "lm_head"),
    ("gptq", {"dynamic": {"-:.*mlp.*": {}}}, "dynamic"), ("awq", {"version": "gemv"}, "version"),
    ("awq", {"zero_point": False}, "zero_point"), ("awq", {"modules_to_not_convert": ["mlp"]},
                                                   "modules_to_not_convert"),
])
def test_checkpoints_we_cannot_run_are_value_errors_naming_the_field(method: str, cfg: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        quantization.get_quantization_config(method, {"quant_method": method, **cfg})


def test_checkpoint_is_detected_from_config_json() -> None:
    assert quantization.checkpoint_quantization(None, {"quant_method": "gptq"}) == "gptq"
    assert quantization.checkpoint_quantization("cpu_bf16", {"quant_method": "awq"}) == "awq"
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes'"):
        quantization.checkpoint_quantization(None, {"quant_method": "bitsandbytes"})


# --- quantized at load (round-to-nearest), the same layout ---


def _spec_unpack_gptq(qweight: torch.Tensor, bits: int) -> list[list[int]]:
    pack, rows, cols = 32 // bits, qweight.shape[0] * (32 // bits), qweight.shape[1]
    words = [[int(w) & 0xFFFFFFFF for w in row] for row in qweight.tolist()]
    return [[(words[i // pack][j] >> (bits * (i % pack))) & ((1 << bits) - 1) for j in range(cols)]
            for i in range(rows)]


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_the_reference_packer(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (32, 16), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    qweight = pack_rows(codes, bits)
    assert torch.equal(qweight, ref.pack_gptq_qweight(codes, bits))
    assert _spec_unpack_gptq(qweight, bits) == codes.tolist()
    assert torch.equal(unpack_rows(qweight, bits), codes)
    if bits == 4:
        assert torch.equal(pack_awq(codes), ref.pack_awq(codes))
        assert torch.equal(unpack_awq(ref.pack_awq(codes)), codes)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_half_a_step(sym: bool) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    codes, scales, zeros = quantize_rtn(w, 4, 32, sym)
    deq = ((codes.view(2, 32, 16) - zeros.unsqueeze(1)) * scales.unsqueeze(1)).reshape(64, 16).t()
    step = scales.repeat_interleave(32, dim=0).t()
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (codes >= 0).all() and (codes <= 15).all()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_fused_layer_quantized_at_load_matches_its_dequantized_weight(method: str) -> None:
    layer = QKVParallelLinear(32, 8, 4, 2, quant_config=quantization.get_quantization_config(
        method, {"bits": 4, "group_size": 16}))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n * 8, 32, generator=gen) for n in (4, 2, 2))
    for shard_id, tensor in {"q": q, "k": k, "v": v}.items():
        layer.weight.weight_loader(layer.weight, tensor, shard_id)
    x = torch.randn(3, 32, generator=gen)
    deq = layer.quant_method.dequantized_weight(layer)
    torch.testing.assert_close(layer(x), x @ deq.t())
    dense = torch.cat([q, k, v])
    assert (deq - dense).abs().max() <= 2 * dense.abs().max() / 15  # RTN 4-bit: within a step
    assert layer.qweight.dtype == torch.int32 and layer.weight.numel() == 0


def test_group_size_not_dividing_is_a_value_error() -> None:
    config = quantization.get_quantization_config("gptq", {"group_size": 24})
    with pytest.raises(ValueError, match="group_size 24"):
        QKVParallelLinear(32, 8, 4, 2, quant_config=config)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_at_load_greedy_matches_the_dequantized_float_model(tmp_path: Path, method: str) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    llm = LLM(str(tmp_path / "float"), quantization=method, device="cpu", dtype="float32",
              skip_tokenizer_init=True, max_model_len=128)
    runner_model = llm.engine.executor.worker.model_runner.model
    with torch.no_grad():  # the reference: each linear weight replaced by what the engine holds
        for name, module in runner_model.named_modules():
            if hasattr(module, "qweight"):
                deq = module.quant_method.dequantized_weight(module)
                parts = dict(qkv_proj=("q_proj", "k_proj", "v_proj"), gate_up_proj=("gate_proj", "up_proj"))
                hf_names = parts.get(name.rsplit(".", 1)[-1], (name.rsplit(".", 1)[-1],))
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                for hf_name, w in zip(hf_names, deq.split([parent.get_submodule(h).weight.shape[0]
                                                           for h in hf_names])):
                    parent.get_submodule(hf_name).weight.copy_(w)
    assert _greedy(llm, PROMPTS, 20) == _greedy_hf(model, PROMPTS, 20)


def test_dummy_weights_load_quantized(tmp_path: Path) -> None:
    """load_format=dummy (the GPU benchmark's setting) fills random codes around the middle zero."""
    tiny_llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = ref.quant_config("gptq", 4, 32, desc_act=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", device="cpu", dtype="float32", skip_tokenizer_init=True,
              max_model_len=64)
    layer = llm.engine.executor.worker.model_runner.model.model.layers[0].mlp.down_proj
    weight = layer.quant_method.dequantized_weight(layer)
    assert weight.abs().max() <= 0.02 + 1e-6 and weight.std() > 0.005
    assert len(_greedy(llm, PROMPTS[:1], 3)[0]) == 3


@pytest.mark.parametrize(("method", "file"), [("gptq", "quantize_config.json"), ("awq", "quant_config.json")])
def test_settings_beside_config_json_as_older_checkpoints_keep_them(tmp_path: Path, method: str, file: str) -> None:
    # AutoGPTQ / AutoAWQ checkpoints from before transformers' quantization_config keep it in its own file.
    model = tiny_llama()
    ref.write_checkpoint(model, tmp_path, method, 4, group=32, sym=method == "gptq", v1=method == "gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    settings = config.pop("quantization_config")
    settings.pop("quant_method")
    if method == "awq":  # AutoAWQ's own names
        settings["w_bit"], settings["q_group_size"] = settings.pop("bits"), settings.pop("group_size")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / file).write_text(json.dumps(settings))
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128)
    qkv = llm.engine.executor.worker.model_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == torch.int32
    assert _greedy(llm, PROMPTS, 8) == _greedy_hf(model, PROMPTS, 8)

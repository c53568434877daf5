"""PEFT adapter loading, slot table and batched shrink/expand vs a per-token reference."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from pagedllm.lora import LoRARequest
from pagedllm.lora.adapter import load_peft_adapter
from pagedllm.lora.punica import add_lora
from pagedllm.lora.slots import LoRASlots, ModuleTargets

HID, INTER = 16, 24
SHAPES = {(0, "q_proj"): (HID, HID), (0, "down_proj"): (INTER, HID), (1, "q_proj"): (HID, HID)}
# The wrapped layers: a fused qkv (q | k | v, k and v of width 8) per layer, and layer 0's down_proj.
# (name, first output column, width, first row of B held: 0 with one rank)
MODULES = {(layer, "qkv_proj"): ModuleTargets(HID, (("q_proj", 0, HID, 0), ("k_proj", HID, 8, 0),
                                                    ("v_proj", HID + 8, 8, 0))) for layer in (0, 1)}
MODULES[(0, "down_proj")] = ModuleTargets(INTER, (("down_proj", 0, HID, 0),))


def _write_adapter(path, rank, alpha, targets=("q_proj", "down_proj"), rslora=False, seed=0, layers=(0,)):
    """A PEFT-layout adapter directory with random weights of real magnitude."""
    g = torch.Generator().manual_seed(seed)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
           "use_rslora": rslora}
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for layer in layers:
        for t in targets:
            i, o = SHAPES[(layer, t)]
            block = "mlp" if t == "down_proj" else "self_attn"
            pre = f"base_model.model.model.layers.{layer}.{block}.{t}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(rank, i, generator=g) / math.sqrt(i)
            tensors[f"{pre}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return tensors


@pytest.mark.parametrize("rslora", [False, True])
def test_load_folds_scaling_into_b(tmp_path, rslora):
    raw = _write_adapter(tmp_path / "a", rank=4, alpha=8, rslora=rslora)
    ad = load_peft_adapter(str(tmp_path / "a"), max_rank=8)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert ad.rank == 4 and ad.scaling == pytest.approx(scale)
    a, b = ad.weights[(0, "q_proj")]
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(a, raw[f"{pre}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{pre}.lora_B.weight"] * scale)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_peft_adapter(str(tmp_path / "missing"), max_rank=8)
    _write_adapter(tmp_path / "big", rank=16, alpha=16)
    with pytest.raises(ValueError, match="max_lora_rank=8"):
        load_peft_adapter(str(tmp_path / "big"), max_rank=8)
    _write_adapter(tmp_path / "emb", rank=4, alpha=4)
    cfg = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["embed_tokens"]
    (tmp_path / "emb" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="embed_tokens"):
        load_peft_adapter(str(tmp_path / "emb"), max_rank=8)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, str(tmp_path))


def test_mixed_batch_matches_per_token_reference(tmp_path):
    """Three adapters of different ranks plus base tokens in one batch: the stacked weights of a fused
    layer give each target's delta in its own columns (q here; k and v, absent from the adapters, get none)."""
    for i in (1, 2, 3):
        _write_adapter(tmp_path / f"a{i}", rank=2 * i, alpha=4 * i, seed=i)
    adapters = {i: load_peft_adapter(str(tmp_path / f"a{i}"), 8) for i in (1, 2, 3)}
    slots = LoRASlots(max_loras=3, max_rank=8, modules=MODULES)
    ids = torch.tensor([1, 0, 2, 3, 3, 0, 1, 2])
    for i, ad in adapters.items():
        slots.activate(i, ad)
    idx = torch.tensor([slots.slot_of(int(i)) for i in ids])
    for key, target, d_in, cols in [((0, "down_proj"), "down_proj", INTER, slice(4, 4 + HID)),
                                    ((0, "qkv_proj"), "q_proj", HID, slice(4, 4 + HID))]:
        x = torch.randn(len(ids), d_in)
        y = torch.randn(len(ids), 4 + MODULES[key].out_features)  # delta at column offset 4, as a shard would be
        out = add_lora(y.clone(), x, slots.a[key], slots.b[key], idx, offset=4)
        ref = y.clone()
        for t, lid in enumerate(ids.tolist()):
            if lid:
                a, b = adapters[lid].weights[(0, target)]
                ref[t, cols] += b @ (a @ x[t])
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out[[1, 5]], y[[1, 5]])  # base tokens untouched


def test_slots_evict_only_idle_adapters(tmp_path):
    _write_adapter(tmp_path / "a", rank=4, alpha=4)
    ad = load_peft_adapter(str(tmp_path / "a"), 8)
    slots = LoRASlots(max_loras=2, max_rank=8, modules=MODULES)
    assert slots.activate(1, ad) == 0 and slots.activate(2, ad) == 1
    assert slots.activate(3, ad, in_use={1}) == 1  # id 2 is idle and evicted, id 1 kept
    with pytest.raises(ValueError, match="max-loras"):
        slots.activate(4, ad, in_use={1, 3})
    assert slots.slot_of(0) == -1

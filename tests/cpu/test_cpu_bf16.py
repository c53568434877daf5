"""cpu_bf16: bf16 weight storage with fp32 activations, and its selection as the CPU default."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import EngineArgs
from pagedllm.models.layers.embedding import LMHead, VocabEmbedding
from pagedllm.models.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedllm.quantization import get_quantization_config
from pagedllm.quantization.cpu_bf16 import CpuBf16Config, CpuBf16LinearMethod


def test_linear_stores_bf16_and_both_paths_match_the_rounded_weight():
    torch.manual_seed(0)
    layer = RowParallelLinear(64, 32, bias=True, quant_config=CpuBf16Config(gemv_rows=4))
    layer.quant_method.gemv_rows = 4  # the widened path too on a CPU with native bf16 (where the config skips it)
    w, b = torch.randn(32, 64), torch.randn(32)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    w_rounded = w.bfloat16().float()
    for rows in (1, 4, 5, 40):  # <= gemv_rows: bf16 GEMV; above: the weight widened to fp32
        x = torch.randn(rows, 64)
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 32)
        ref = F.linear(x, w_rounded, b)
        torch.testing.assert_close(y, ref, atol=0.1, rtol=0.02)  # bf16-rounded input on the GEMV path
    x = torch.randn(40, 64)  # the wide path: rounded input times rounded weight, output rounded like bf16's
    torch.testing.assert_close(layer(x), F.linear(x.bfloat16().float(), w_rounded).bfloat16().float() + b)
    # Batch invariance: a row gives (nearly) the same result alone (GEMV) as inside a wide batch.
    assert torch.equal(layer(x[:1]), layer(x)[:1])  # bit for bit here (oneDNN accumulates bf16 in fp32)


def test_fused_qkv_shards_land_in_their_spans():
    layer = QKVParallelLinear(16, 4, num_heads=4, num_kv_heads=2, quant_config=CpuBf16Config())
    parts = {"q": torch.randn(16, 16), "k": torch.randn(8, 16), "v": torch.randn(8, 16)}
    for shard, t in parts.items():
        layer.weight.weight_loader(layer.weight, t, shard)
    assert torch.equal(layer.weight.float(), torch.cat(list(parts.values())).bfloat16().float())


def test_tied_embedding_and_lm_head_share_one_bf16_matrix():
    method = CpuBf16LinearMethod(gemv_rows=16)
    embed = VocabEmbedding(100, 8, quant_method=method)
    head = LMHead(100, 8, tied_to=embed)
    full = torch.randn(100, 8)
    embed.weight.weight_loader(embed.weight, full)
    assert head.weight is embed.weight and embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([3, 99])
    assert embed(ids).dtype == torch.float32
    torch.testing.assert_close(embed(ids), full[ids].bfloat16().float())
    hidden = torch.randn(2, 8)
    torch.testing.assert_close(head(hidden), hidden @ full.bfloat16().float().T, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"device": "cpu"}, "cpu_bf16"),
    ({"device": "cpu", "dtype": "float32"}, None),
    ({"device": "cpu", "dtype": "bfloat16"}, None),
    ({"device": "cuda"}, None),
    ({"device": "cpu", "quantization": "cpu_bf16", "dtype": "float32"}, "cpu_bf16"),
])
def test_cpu_default_is_the_fast_path_unless_precision_is_asked_for(kwargs, expected):
    assert EngineArgs(**kwargs).model_config().quantization == expected


def test_registered_and_configurable():
    config = get_quantization_config("cpu_bf16", {"gemv_rows": 3})
    assert isinstance(config, CpuBf16Config)
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        EngineArgs(quantization="int3")


# ---- int4 for decode steps (a GGUF's 4-bit weights) -------------------------------------------------------
def _with_codes(w: torch.Tensor, packed, qtype) -> torch.Tensor:
    """``w`` carrying the codes of ``packed`` (what the GGUF loader attaches with int4_codes=True)."""
    from pagedllm.loader.gguf_dequant import INT4_CODES, int4_parts

    setattr(w, INT4_CODES, tuple(torch.from_numpy(p) for p in int4_parts(packed, qtype)))
    return w


def _q4_1(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weight as a Q4_1 file dequantizes it, carrying its codes; the codes) from the gguf package's
    quantizer."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :32] += 3.0  # a block far from zero: a large minimum next to a small spread
    packed = quants.quantize(w, GGMLQuantizationType.Q4_1)  # (rows, cols / 32 * 20) bytes
    blocks = packed.reshape(rows, cols // 32, 20)[..., 4:]
    codes = np.concatenate([blocks & 0x0F, blocks >> 4], axis=-1).reshape(rows, cols)  # low nibbles first
    dequantized = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType.Q4_1).reshape(rows, cols))
    return _with_codes(dequantized, packed, GGMLQuantizationType.Q4_1), torch.from_numpy(codes.astype(np.uint8))


def _split_with_codes(w: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    from pagedllm.loader.gguf_dequant import INT4_CODES

    parts = [t.split(sizes) for t in getattr(w, INT4_CODES)]
    out = []
    for i, piece in enumerate(w.split(sizes)):
        piece = piece.clone()
        setattr(piece, INT4_CODES, tuple(p[i] for p in parts))
        out.append(piece)
    return out


def _int4_layer(w: torch.Tensor, fused: bool) -> torch.nn.Module:
    n, k = w.shape
    config = CpuBf16Config(int4_seqs=4)
    if fused:  # loaded by shards, packed once the last shard is in
        layer = QKVParallelLinear(k, 16, num_heads=n // 32, num_kv_heads=n // 64, quant_config=config)
        q, kk, v = _split_with_codes(w, [n // 2, n // 4, n // 4])
        for shard, t in (("k", kk), ("q", q), ("v", v)):
            assert layer.int4_weight is None
            layer.weight.weight_loader(layer.weight, t, shard)
    else:
        layer = RowParallelLinear(k, n, bias=False, quant_config=config)
        layer.weight.weight_loader(layer.weight, w)
    assert layer.int4_weight is not None and layer.int4_staging is None
    return layer


@pytest.mark.parametrize("fused", [False, True])
def test_int4_weights_serve_decode_steps_and_bf16_the_rest(fused):
    from pagedllm.loader.gguf_dequant import INT4_CODES
    from pagedllm.quantization.base import step_shape

    torch.manual_seed(0)
    w, codes = _q4_1(64, 128)
    layer = _int4_layer(w, fused)
    # What the int4 path computes: the file's codes * bf16 scale + bf16 zero, times the bf16-rounded input.
    q, scale, low = getattr(w, INT4_CODES)
    assert torch.equal(q, codes)
    s16, z16 = scale.bfloat16().float(), (low + 8 * scale).bfloat16().float()
    w_int4 = ((q.float().view(64, 4, 32) - 8) * s16[..., None] + z16[..., None]).view(64, 128)
    x = torch.randn(10, 128)
    int4_ref = F.linear(x.bfloat16().float(), w_int4)
    bf16_ref = F.linear(x.bfloat16(), w.bfloat16()).float()
    assert not torch.equal(int4_ref.bfloat16().float(), bf16_ref)  # the two paths are told apart
    with step_shape(num_seqs=2, decoding=True):  # decodes / a verification: int4, one row as in ten
        y = layer(x)
        torch.testing.assert_close(y, int4_ref, atol=0.02, rtol=0.01)  # output rounded to bf16
        assert torch.equal(layer(x[3:4]), y[3:4])
    with step_shape(num_seqs=8, decoding=True):  # more sequences than int4_seqs: bf16
        assert torch.equal(layer(x), bf16_ref)
    with step_shape(num_seqs=1, decoding=False):  # a prompt chunk, however short: bf16
        assert not torch.allclose(layer(x), y, atol=1e-6)
    torch.testing.assert_close(layer(x[:2]), int4_ref[:2], atol=0.02, rtol=0.01)  # no step: by rows
    assert layer.int4_weight.numel() == 64 * 128 // 2  # a quarter of the bf16 bytes


def test_default_model_keeps_its_q4_1_weights_as_int4():
    from pagedllm import LLM

    llm = LLM(device="cpu", max_model_len=256)
    model = llm.engine.executor.worker.model_runner.model
    linears = [m for m in model.modules() if hasattr(m, "int4_weight")]
    assert len(linears) == 4 * model.config.num_hidden_layers and all(m.int4_weight is not None for m in linears)
    exact = LLM(device="cpu", max_model_len=256, dtype="float32")
    assert not any(hasattr(m, "int4_weight") for m in exact.engine.executor.worker.model_runner.model.modules())


def test_int4_only_for_weights_with_their_codes_and_kernel_shapes():
    from pagedllm.quantization.base import step_shape

    torch.manual_seed(0)
    off_grid = RowParallelLinear(128, 64, bias=False, quant_config=CpuBf16Config(int4_seqs=4))
    w = torch.randn(64, 128)
    off_grid.weight.weight_loader(off_grid.weight, w)  # a float weight (no codes): int4 would change it
    assert off_grid.int4_weight is None and off_grid.int4_staging is None
    on_grid, _ = _q4_1(40, 128)
    narrow = RowParallelLinear(128, 40, bias=False, quant_config=CpuBf16Config(int4_seqs=4))  # 40 % 16 != 0
    narrow.weight.weight_loader(narrow.weight, on_grid)
    assert getattr(narrow, "int4_weight", None) is None
    x = torch.randn(2, 128)
    with step_shape(num_seqs=1, decoding=True):  # both multiply by their bf16 weight
        assert torch.equal(off_grid(x), F.linear(x.bfloat16(), w.bfloat16()).float())
        assert torch.equal(narrow(x), F.linear(x.bfloat16(), on_grid.bfloat16()).float())


def test_tensor_parallel_slices_carry_their_codes():
    from pagedllm.loader.gguf_dequant import INT4_CODES

    w, _ = _q4_1(64, 128)
    layer = RowParallelLinear(128, 64, bias=False, quant_config=CpuBf16Config(int4_seqs=4))
    method, codes = layer.quant_method, getattr(w, INT4_CODES)
    rows = method.shard(layer, layer.weight, w, out_span=(16, 32))
    assert torch.equal(getattr(rows, INT4_CODES)[0], codes[0][16:48])
    assert torch.equal(getattr(rows, INT4_CODES)[1], codes[1][16:48])
    cols = method.shard(layer, layer.weight, w, in_span=(64, 64))  # whole groups of 32 inputs
    assert torch.equal(getattr(cols, INT4_CODES)[0], codes[0][:, 64:])
    assert torch.equal(getattr(cols, INT4_CODES)[2], codes[2][:, 2:])
    odd = method.shard(layer, layer.weight, w, in_span=(48, 80))  # splits a group: no codes, the layer stays bf16
    assert odd.shape == (64, 80) and not hasattr(odd, INT4_CODES)

"""The Triton GPTQ/AWQ kernels (gptq_triton.py) against the torch dequantize-then-matmul reference.

On the CPU under TRITON_INTERPRET=1 (fp32 and fp16; 4/8 bits; groups in order, smaller than a
tile, act-order g_idx, one group per row; split-K; M, N and K tails): the in-kernel GEMM, the
dequantize kernel (exact), and the dispatch by M. Compiled on a GPU in bf16, through the layer.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedllm.quantization.int_packing import dequantize, pack_cols, pack_rows, unpack_rows
from tests.quantization import gptq_reference as ref

pytest.importorskip("triton")

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU machines)")


def _weights(k: int, n: int, bits: int, group: int, act_order: bool, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(k + n + bits)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 2**bits + 1, (k // group, n), generator=gen).to(dtype)  # v1 zeros reach 2**bits
    g_idx = ref.act_order_g_idx(k, group, seed=k) if act_order else torch.arange(k, dtype=torch.int32) // group
    return pack_rows(codes, bits), scales, zeros, g_idx


def _dense(qweight, scales, zeros, g_idx, bits) -> torch.Tensor:
    """The torch path's (N, K) weight, in fp32."""
    return dequantize(unpack_rows(qweight, bits), scales.float(), zeros.float(), g_idx)


@pytest.fixture
def interpreted(monkeypatch):
    """gptq_triton reloaded under TRITON_INTERPRET=1 (read when its kernels are defined), restored afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from pagedllm.quantization import gptq_triton

    importlib.reload(gptq_triton)
    yield gptq_triton
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(gptq_triton)


CASES = [  # m, k, n, bits, group, act_order, split_k
    (5, 256, 136, 4, 128, False, 1),   # one group a tile; an N tail
    (5, 256, 136, 4, 128, False, 2),   # split-K partial sums
    (3, 160, 64, 4, 32, False, 1),     # groups smaller than a tile; a K tail (160 = 128 + 32)
    (3, 160, 64, 4, 32, True, 1),      # act-order: a group per input row
    (16, 192, 96, 8, 192, False, 2),   # 8 bits, one group per row (group_size = K)
    (1, 128, 48, 4, 64, True, None),   # batch 1, split-K chosen
    (2, 64, 32, 4, 4, False, 1),       # groups that split a word: read through g_idx
]


@interpreter_only
@pytest.mark.parametrize(("m", "k", "n", "bits", "group", "act_order", "split_k"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_kernel_matches_the_torch_dequantize_interpreted(interpreted, m, k, n, bits, group, act_order,
                                                              split_k, dtype) -> None:
    packed = _weights(k, n, bits, group, act_order, dtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 0.5).to(dtype)
    y = interpreted.gptq_gemm(x, *packed, bits, group, act_order,
                              config=None if split_k is None else {"split_k": split_k})
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), x.float() @ _dense(*packed, bits).t(), atol=tol, rtol=tol)


@interpreter_only
@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, 32, False), (4, 32, True), (8, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_is_exact_and_large_batches_use_it_interpreted(interpreted, bits, group, act_order,
                                                                         dtype) -> None:
    k, n = 192, 264  # K and N tails for the 16-word x 256-column tiles
    packed = _weights(k, n, bits, group, act_order, dtype)
    w = interpreted.dequantize_triton(*packed, bits, group, act_order, dtype)
    assert torch.equal(w, _dense(*packed, bits).t().to(dtype))  # (q - z) exact, one rounding of the product
    x = torch.randn(interpreted.GEMM_MAX_ROWS + 1, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(interpreted.gptq_matmul(x, *packed, bits, group, act_order), x @ w)


@interpreter_only
def test_gguf_float32_scales_and_fractional_zeros_interpreted(interpreted) -> None:
    """``--quantization gguf`` keeps fp32 scales and zeros = -low / scale (not integers) with fp16 or bf16
    activations: both kernels read them as they read GPTQ's."""
    gen = torch.Generator().manual_seed(3)
    k, n = 160, 96
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.001
    zeros = torch.rand(k // 32, n, generator=gen) * 40 - 5  # Q4_1 minimums far from a code
    packed = (pack_rows(codes, 4), scales, zeros, torch.arange(k, dtype=torch.int32) // 32)
    dense = _dense(*packed, 4)
    x = (torch.randn(3, k, generator=gen) * 0.5).half()
    torch.testing.assert_close(interpreted.gptq_gemm(x, *packed, 4, 32, False).float(), x.float() @ dense.t(),
                               atol=2e-2, rtol=2e-2)
    w = interpreted.dequantize_triton(*packed, 4, 32, False, torch.float16)
    assert torch.equal(w, dense.t().half())


@interpreter_only
def test_kernel_catches_a_wrong_group_interpreted(interpreted) -> None:
    """Negative control: the same act-order weight read as if its groups were in input order differs."""
    packed = _weights(128, 64, 4, 32, True, torch.float32)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    right = interpreted.gptq_gemm(x, *packed, 4, 32, True)
    wrong = interpreted.gptq_gemm(x, *packed, 4, 32, False)
    torch.testing.assert_close(right, x @ _dense(*packed, 4).t(), atol=1e-4, rtol=1e-4)
    assert (right - wrong).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16, 64, 300])
def test_gpu_layer_bf16_matches_the_dequantized_matmul(rows: int, act_order: bool) -> None:
    """A 4-bit gate_up layer on the GPU (Triton, bf16) against fp32 math on its dequantized weight."""
    from pagedllm import quantization
    from pagedllm.models.layers.linear import MergedColumnParallelLinear

    config = quantization.get_quantization_config("gptq", ref.quant_config("gptq", 4, 128, desc_act=act_order))
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = MergedColumnParallelLinear(4096, [1024, 2048], quant_config=config)
        finally:
            torch.set_default_dtype(torch.float32)
    for shard, n in enumerate((1024, 2048)):
        qweight, scales, zeros, g_idx = _weights(4096, n, 4, 128, act_order, torch.float16)  # one g_idx
        tensors = {"qweight": qweight, "qzeros": pack_cols(zeros.int().clamp(1, 15) - 1, 4),  # v1: zero - 1
                   "scales": scales, "g_idx": g_idx}
        for name, t in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), t, shard)
    assert layer.act_order == act_order
    x = torch.randn(rows, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    want = x @ layer.quant_method.dequantized_weight(layer).float().t()
    got = layer(x.to(torch.bfloat16)).float()
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-2, err

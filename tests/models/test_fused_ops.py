"""Fused Triton element-wise kernels (layers/fused_ops.py) against the layers' torch code.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set
before the kernels are defined) in fp32, where they must match the torch path to
float rounding; the ``gpu`` tests run them compiled in bf16 through the layers
themselves (given the kernels by ``select_kernels`` on CUDA) against the torch path.
"""

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from pagedllm.models.layers import fused_ops  # noqa: E402
from pagedllm.models.layers.activation import SiluAndMul  # noqa: E402
from pagedllm.models.layers.kernels import fused_kernels_wanted, select_kernels  # noqa: E402
from pagedllm.models.layers.norm import RMSNorm  # noqa: E402
from pagedllm.models.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_ONLY = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests (TRITON_INTERPRET=1 was not set first)")


def _norm(hidden: int, dtype: torch.dtype, device: str) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5).to(device=device, dtype=dtype)
    norm.weight.data = 1 + 0.3 * torch.randn(hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return norm


@CPU_ONLY
@pytest.mark.parametrize("hidden", [64, 100])  # 100: a row that does not fill the power-of-two block
def test_rms_norm_interpreted(hidden: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, hidden, generator=gen), torch.randn(5, hidden, generator=gen)
    norm = _norm(hidden, torch.float32, "cpu")
    torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, norm.eps), norm(x))
    out, res_out = fused_ops.rms_norm(x, norm.weight, norm.eps, res)
    ref_out, ref_res = norm(x, res)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(res_out, ref_res)
    # A strided input of 3 dims (Qwen3's per-head q/k norm sees a slice of the qkv output).
    qkv = torch.randn(4, 3 * 2 * hidden, generator=gen)
    q = qkv[:, : 2 * hidden].view(4, 2, hidden)
    torch.testing.assert_close(fused_ops.rms_norm(q, norm.weight, norm.eps), norm(q))


@CPU_ONLY
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 24)])
def test_rotary_interpreted(heads: int, kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(head_dim, 64, 10000.0, {"rope_type": "default"})
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q = qkv[:, : heads * head_dim].view(6, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    positions = torch.tensor([0, 5, 17, 63, 2, 2])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())  # CPU tensors: the torch path
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    out_q, out_k = fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)
    torch.testing.assert_close(q, ref_q)  # in place, through the strided views
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@CPU_ONLY
@pytest.mark.parametrize("d", [32, 1500])  # 1500: two column blocks, the second partly masked
def test_silu_and_mul_interpreted(d: int) -> None:
    x = torch.randn(3, 2 * d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused_ops.silu_and_mul(x), SiluAndMul()(x))


def test_kernel_choice_follows_device_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    norm = RMSNorm(8)
    assert not fused_kernels_wanted("cpu") and select_kernels(norm, "cpu") is False
    assert norm._fused is None
    assert select_kernels(norm, "cpu", fused=True) is True and norm._fused is fused_ops.rms_norm
    monkeypatch.setenv("PAGEDLLM_FUSED_OPS", "0")
    assert not fused_kernels_wanted("cuda")
    monkeypatch.setenv("PAGEDLLM_FUSED_OPS", "1")
    assert fused_kernels_wanted("cuda")


# ---- GPU: select_kernels gives the layers the kernels on CUDA; compare with the torch path ---------------

def _torch_path(monkeypatch: pytest.MonkeyPatch, layer: nn.Module, fn):
    # PAGEDLLM_FUSED_OPS=0 is read when the kernels are chosen: choose again for the reference.
    with monkeypatch.context() as m:
        m.setenv("PAGEDLLM_FUSED_OPS", "0")
        assert not select_kernels(layer, "cuda")
        try:
            return fn()
        finally:
            m.delenv("PAGEDLLM_FUSED_OPS")
            assert select_kernels(layer, "cuda")


def _close_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
def test_layers_fused_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    dtype, dev = torch.bfloat16, "cuda"
    x, res = torch.randn(37, 4096, device=dev, dtype=dtype), torch.randn(37, 4096, device=dev, dtype=dtype)
    norm = _norm(4096, dtype, dev)
    act = SiluAndMul()
    rope = RotaryEmbedding(128, 8192, 500000.0, {"rope_type": "default"}).to(dev)
    for layer in (norm, act, rope):
        assert select_kernels(layer, dev)
    out, res_out = norm(x, res)
    ref_out, ref_res = _torch_path(monkeypatch, norm, lambda: norm(x, res))
    _close_bf16(out, ref_out)
    assert torch.equal(res_out, ref_res)  # the add rounds the same way
    _close_bf16(norm(x), _torch_path(monkeypatch, norm, lambda: norm(x)))

    y = torch.randn(37, 2 * 14336, device=dev, dtype=dtype)
    _close_bf16(act(y), _torch_path(monkeypatch, act, lambda: act(y)))

    qkv = torch.randn(37, 48 * 128, device=dev, dtype=dtype)
    positions = torch.randint(0, 8192, (37,), device=dev)

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[:, : 32 * 128].view(37, 32, 128), t[:, 32 * 128 : 40 * 128].view(37, 8, 128)

    ref_q, ref_k = _torch_path(monkeypatch, rope, lambda: rope(positions, *views(qkv.clone())))
    q, k = rope(positions, *views(qkv))
    _close_bf16(q, ref_q)
    _close_bf16(k, ref_k)

"""Triton BGMV LoRA kernel vs the torch ops (interpreter on CPU, compiled on GPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is defined

pytest.importorskip("triton")

from pagedllm.lora.punica import add_lora  # noqa: E402
from pagedllm.lora.triton_punica import add_lora_triton  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _case(num_tokens, d_in, d_out, slots, rank, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=g)
    a = torch.randn(slots, rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(slots, d_out, rank, generator=g) * 0.1
    idx = torch.randint(-1, slots, (num_tokens,), generator=g)
    idx[0] = -1  # always at least one base-model row
    y = torch.randn(num_tokens, d_out + 8, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, a, b, y)] + [idx.to(device)]


@pytest.mark.skipif(not INTERPRETED, reason="interpreter test")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_matches_torch_interpreted(dtype, tol):
    # d_in / d_out not multiples of the block sizes: checks the tail masks.
    x, a, b, y, idx = _case(7, 80, 70, 3, 8, dtype, "cpu")
    ref = add_lora(y.float().clone(), x.float(), a.float(), b.float(), idx, offset=8)
    out = add_lora_triton(y.clone(), x, a, b, idx, offset=8)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out[idx == -1], y[idx == -1])  # base rows unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_matches_torch_gpu_bf16():
    x, a, b, y, idx = _case(256, 4096, 1024, 8, 16, torch.bfloat16, "cuda")
    ref = add_lora(y.float().clone(), x.float(), a.float(), b.float(), idx, offset=8)
    out = add_lora_triton(y.clone(), x, a, b, idx, offset=8)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)

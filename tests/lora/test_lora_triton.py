"""Triton SGMV LoRA kernel vs the torch ops (interpreter on CPU, compiled on GPU)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is defined

pytest.importorskip("triton")

from pagedllm.lora.punica import add_lora  # noqa: E402
from pagedllm.lora.triton_punica import BLOCK_M, add_lora_sgmv, num_plan_blocks, sgmv_plan  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _case(num_tokens, d_in, d_out, slots, rank, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=g)
    a = torch.randn(slots, rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(slots, d_out, rank, generator=g) * 0.1
    idx = torch.randint(-1, slots, (num_tokens,), generator=g)
    idx[0] = -1  # always at least one base-model row
    y = torch.randn(num_tokens, d_out + 8, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, a, b, y)] + [idx]


def _run(y, x, a, b, idx, max_loras, offset=8, spare_blocks=3):
    num_blocks = num_plan_blocks(len(idx), max_loras)
    perm, blocks = sgmv_plan(idx.numpy().astype(np.int32), num_blocks + spare_blocks)
    perm, blocks = torch.from_numpy(perm).to(x.device), torch.from_numpy(blocks).to(x.device)
    return add_lora_sgmv(y, x, a, b, perm, blocks, num_blocks, offset)


def test_plan_covers_each_adapter_token_once():
    slots = np.array([2, -1, 0, 2, 2, 0, -1] + [1] * 40, dtype=np.int32)
    n = num_plan_blocks(len(slots), 3)
    perm, blocks = sgmv_plan(slots, n)
    used = blocks[0] >= 0
    covered = np.concatenate([perm[s:s + m] for s, m in zip(blocks[1][used], blocks[2][used])])
    assert sorted(covered.tolist()) == np.flatnonzero(slots >= 0).tolist()
    for slot, s, m in blocks.T[used]:
        assert (slots[perm[s:s + m]] == slot).all() and 1 <= m <= BLOCK_M
    assert used.sum() <= n and (blocks[:, ~used] == -1).all()


@pytest.mark.skipif(not INTERPRETED, reason="interpreter test")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_sgmv_matches_torch_interpreted(dtype, tol):
    # d_in / d_out not multiples of the block sizes, rank below 16, more tokens of a slot than a block.
    x, a, b, y, idx = _case(37, 80, 70, 3, 8, dtype, "cpu")
    ref = add_lora(y.float().clone(), x.float(), a.float(), b.float(), idx, offset=8)
    out = _run(y.clone(), x, a, b, idx, max_loras=3)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out[idx == -1], y[idx == -1])  # base rows unchanged
    # Negative control: a plan that forgets a block leaves those tokens without their delta.
    perm, blocks = sgmv_plan(idx.numpy().astype(np.int32), num_plan_blocks(37, 3))
    blocks[0, 0] = -1
    partial = add_lora_sgmv(y.clone(), x, a, b, torch.from_numpy(perm), torch.from_numpy(blocks), blocks.shape[1], 8)
    assert not torch.allclose(partial.float(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sgmv_matches_torch_gpu_bf16():
    x, a, b, y, idx = _case(256, 4096, 1024, 8, 16, torch.bfloat16, "cuda")
    ref = add_lora(y.float().clone(), x.float(), a.float(), b.float(), idx.cuda(), offset=8)
    out = _run(y.clone(), x, a, b, idx, max_loras=8)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)

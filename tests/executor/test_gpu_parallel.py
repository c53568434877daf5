"""On one GPU: a worker joins an NCCL world through ``init_parallel`` (the path every rank of a multi-GPU
world takes) and the layers' collectives run over its explicit groups. Worlds of two GPUs and more need a
machine with them (not in CI)."""

from __future__ import annotations

import socket

import pytest
import torch

from pagedllm.models.layers import parallel

pytestmark = pytest.mark.gpu


def test_nccl_world_of_one_joins_and_reduces_over_its_groups() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    device = torch.device("cuda", 0)
    try:
        state = parallel.init_parallel(1, 1, 0, f"tcp://127.0.0.1:{port}", device)
        assert torch.distributed.get_backend() == "nccl"
        assert state.tp_group is not None and state.pp_group is not None
        x = torch.arange(8, dtype=torch.float32, device=device)
        parallel.set_parallel_state(parallel.ParallelState(tp_rank=0, tp_size=2, tp_group=state.tp_group))
        # tp_size 2 forces the collective; over a group of one it sums only this rank's part.
        assert torch.equal(parallel.all_reduce(x.clone()), x)
    finally:
        parallel.destroy_parallel()

"""EngineArgs validation and the component configs it builds (no model is loaded)."""

from __future__ import annotations

import argparse

import pytest

from pagedllm.config import EngineArgs, ParallelConfig


@pytest.mark.parametrize("field", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_sizes_below_one_are_a_clear_error(field: str) -> None:
    assert EngineArgs(**{field: 2}).parallel_config().world_size == 2
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        EngineArgs(**{field: 0})


def test_parallel_config_and_cli_flags() -> None:
    assert EngineArgs().parallel_config() == ParallelConfig(1, 1)
    assert ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3).world_size == 6
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["-tp", "1", "--pipeline-parallel-size", "1"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.quantization) == (1, 1, None)
    args = EngineArgs.from_cli_args(parser.parse_args(["--tensor-parallel-size", "4", "-pp", "2"]))
    assert args.parallel_config().world_size == 8
    with pytest.raises(ValueError, match="quantization: unknown method 'fp4'"):
        EngineArgs.from_cli_args(parser.parse_args(["--quantization", "fp4"]))
    assert EngineArgs.from_cli_args(parser.parse_args(["--quantization", "fp8"])).quantization == "fp8"


def test_step_token_budget_defaults_to_2048_on_a_cpu_and_8192_on_a_gpu() -> None:
    assert EngineArgs(device="cpu").scheduler_config(4096).max_num_batched_tokens == 2048
    assert EngineArgs(device="cuda").scheduler_config(4096).max_num_batched_tokens == 8192
    assert EngineArgs(device="cpu", max_num_seqs=4000).scheduler_config(4096).max_num_batched_tokens == 4000
    assert EngineArgs(device="cpu", max_num_batched_tokens=512).scheduler_config(4096).max_num_batched_tokens == 512

"""The command line, run as a user runs it: `pagedllm generate`, `pagedllm chat`, `pagedllm serve --help`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedllm import LLM, SamplingParams


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(device="cpu", max_model_len=256)


def test_generate_prints_the_greedy_completion(reference: LLM) -> None:
    proc = _cli("generate", "The capital of France is", "--max-tokens", "8", "--max-model-len", "256",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    expected = reference.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                                  use_tqdm=False)[0].outputs[0].text
    assert proc.stdout.rstrip("\n") == expected


def test_chat_answers_each_turn(reference: LLM) -> None:
    proc = _cli("chat", "--max-tokens", "12", "--max-model-len", "256", "--device", "cpu",
                stdin="What is the capital of France?\n\n")
    assert proc.returncode == 0, proc.stderr
    expected = reference.chat([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    assert expected.strip() and expected in proc.stdout


def test_serve_help_lists_the_server_flags() -> None:
    proc = _cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--block-size"):
        assert flag in proc.stdout


def test_bad_flag_value_is_a_clear_error() -> None:
    proc = _cli("generate", "hi", "--block-size", "12", "--device", "cpu")
    assert proc.returncode != 0
    assert "block_size must be a power of two" in proc.stderr


def test_a_tensor_parallel_size_the_model_cannot_split_is_a_clear_error() -> None:
    proc = _cli("generate", "hi", "-tp", "2", "--device", "cpu")  # SmolLM2 has 9 attention heads
    assert proc.returncode == 1
    assert "num_attention_heads (9) is not divisible by the tensor-parallel size (2)" in proc.stderr
    assert "Traceback" not in proc.stderr

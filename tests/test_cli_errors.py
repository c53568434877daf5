"""Every subcommand fails the same way: one line on stderr, exit status 1, a traceback only with --debug."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from pagedllm import __version__
from pagedllm.server.api_server import make_arg_parser


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, prog: str, words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: ") and words in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2")
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return str(path)


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_bad_model_path(command: str) -> None:
    args = ["generate", "hi"] if command == "generate" else [command]
    proc = _cli(*args, "--model", "/no/such/model.gguf", "--device", "cpu")
    _one_error_line(proc, f"pagedllm {command}", "'/no/such/model.gguf' does not exist")


def test_bad_dtype_and_unknown_architecture(gpt2_dir: str) -> None:
    _one_error_line(_cli("generate", "hi", "--dtype", "float8", "--device", "cpu"), "pagedllm generate",
                    "dtype must be auto, float32, float16 or bfloat16")
    proc = _cli("serve", "--model", gpt2_dir, "--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu")
    _one_error_line(proc, "pagedllm serve", "architecture GPT2LMHeadModel is not supported")


def test_context_longer_than_the_kv_cache() -> None:
    proc = _cli("generate", "hi", "--load-format", "dummy", "--device", "cpu", "--cpu-kv-cache-gib", "0.01")
    _one_error_line(proc, "pagedllm generate", "max_model_len 8192 is longer than the KV cache holds")


def test_port_in_use_is_found_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli("serve", "--port", str(port), "--device", "cpu", timeout=60)
    _one_error_line(proc, "pagedllm serve", f"cannot listen on 127.0.0.1:{port}")
    assert "config:" not in proc.stderr  # refused before the first start-up phase


def test_debug_shows_the_traceback() -> None:
    proc = _cli("generate", "hi", "--model", "/no/such/dir", "--device", "cpu", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "does not exist" in proc.stderr.splitlines()[-1]


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"pagedllm {__version__}"


def test_vllm_flags_parse_and_features_not_built_say_so() -> None:
    proc = _cli("serve", "--prompt-adapters", "a=b", "--device", "cpu", timeout=60)
    _one_error_line(proc, "pagedllm serve", "--prompt-adapters is not supported yet")
    # A LoRA adapter that cannot be served stops start-up before the model loads.
    proc = _cli("serve", "--enable-lora", "--lora-modules", "a=/no/such/adapter", "--device", "cpu", timeout=60)
    _one_error_line(proc, "pagedllm serve", "'/no/such/adapter' is not a directory")
    proc = _cli("serve", "--lora-modules", "a=b", "--device", "cpu", timeout=60)
    _one_error_line(proc, "pagedllm serve", "--lora-modules needs --enable-lora")
    proc = _cli("serve", "--cpu-offload-gb", "4", timeout=60)
    _one_error_line(proc, "pagedllm serve", "--cpu-offload-gb is not supported yet")
    # Neutral values and knobs with no effect pass the flag check (the config file below then stops start-up).
    proc = _cli("serve", "--kv-cache-dtype", "auto", "--tokenizer-mode", "auto", "--enable-chunked-prefill",
                "--max-seq-len-to-capture", "8192", "--trust-remote-code", "--disable-log-requests",
                "--uvicorn-log-level", "warning", "--config", "/no/such.yaml", timeout=60)
    _one_error_line(proc, "pagedllm serve", "--config: cannot read '/no/such.yaml'")


def test_every_serve_flag_has_help_with_its_default() -> None:
    parser = make_arg_parser()
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not undocumented
    text = parser.format_help()
    assert "--max-num-seqs MAX_NUM_SEQS\n" in text and "(default: 256)" in text


def test_sampling_seed_keeps_its_old_name_as_a_deprecated_alias() -> None:
    from pagedllm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "x", "--sampling-seed", "7"]).sampling_seed == 7
    assert parser.parse_args(["generate", "x", "--seed-sampling", "7"]).sampling_seed == 7

"""Hugging Face repo ids, resolved offline from a cache laid out here as huggingface_hub lays it out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pagedllm.config import ModelConfig
from pagedllm.loader.hub import is_hub_id, resolve_hub_id
from pagedllm.loader.resolve import resolve_model

REPO = "tiny-org/tiny-llama"
MAIN, V2 = "a" * 40, "b" * 40


def _snapshot(cache: Path, commit: str, refs: list[str], max_len: int, tokenizer) -> Path:
    """One snapshot of REPO: config, safetensors weights and a tokenizer; ``refs`` point at it."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(snap, safe_serialization=True)
    tokenizer.save_pretrained(snap)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, smollm2_tokenizer) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    _snapshot(cache, MAIN, ["main"], 256, smollm2_tokenizer)
    _snapshot(cache, V2, ["v2"], 512, smollm2_tokenizer)
    return cache


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_repo_ids_are_told_from_paths() -> None:
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not any(map(is_hub_id, ["/abs/model", "./rel", "model.gguf", "a/b/c", "../x", "dir/file.gguf"]))


def test_repo_id_resolves_from_the_cache_at_a_revision(hub_cache: Path) -> None:
    main = resolve_model(ModelConfig(model=REPO, download_dir=str(hub_cache)), "cpu")
    assert main.model == str(hub_cache / f"models--tiny-org--tiny-llama/snapshots/{MAIN}")
    assert (main.load_format, main.max_model_len) == ("hf", 256)
    v2 = resolve_model(ModelConfig(model=REPO, revision="v2", download_dir=str(hub_cache)), "cpu")
    assert v2.model.endswith(V2) and v2.max_model_len == 512
    assert resolve_model(ModelConfig(model=REPO, revision=V2, download_dir=str(hub_cache)), "cpu").model == v2.model


def test_llm_generates_from_a_cached_repo_id(hub_cache: Path) -> None:
    from pagedllm import LLM, SamplingParams

    with LLM(REPO, download_dir=str(hub_cache), device="cpu", cpu_kv_cache_gib=0.01) as llm:
        out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        assert llm.get_tokenizer().chat_template  # the snapshot's tokenizer, template included


def test_offline_without_a_cache_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'tiny-org/missing' is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        resolve_hub_id("tiny-org/missing", download_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at revision 'v9' is not in the Hugging Face cache"):
        resolve_hub_id(REPO, revision="v9", download_dir=str(tmp_path))


def test_no_network_and_no_cache_from_the_cli(tmp_path) -> None:
    # Online mode, but the Hub endpoint refuses connections: what a machine without network sees.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "pagedllm.cli", "generate", "hi", "--model", "tiny-org/missing",
                           "--download-dir", str(tmp_path), "--device", "cpu"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "could not be downloaded" in errors[0] and "Traceback" not in proc.stderr

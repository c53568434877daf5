"""Loaded-once references for end-to-end tests: the offline engine and HF transformers' model (both fp32 CPU).

Plain functions cached per process (not fixtures), so test modules under different directories
share one copy of each and every module still works when run alone.
"""

from __future__ import annotations

import functools
import os

import torch

from pagedllm import LLM


@functools.cache
def offline_llm() -> LLM:
    """The default model as `LLM` runs it offline, sized like the e2e servers (max_model_len 512)."""
    return LLM(device="cpu", dtype="float32", max_model_len=512, num_gpu_blocks_override=256)


@functools.cache
def hf_model() -> torch.nn.Module:
    """HF transformers' model of the same default GGUF, in fp32."""
    from transformers import AutoModelForCausalLM

    from pagedllm.loader import default_model_path

    directory, filename = os.path.split(default_model_path())
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()


@torch.no_grad()
def hf_log_softmax(token_ids: list[int]) -> torch.Tensor:
    """HF's log-probabilities of the next token after each position of `token_ids`: (len, vocab)."""
    logits = hf_model()(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def hf_greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate` greedy continuation (it stops after EOS, as the engine does by default)."""
    ids = torch.tensor([prompt_ids])
    out = hf_model().generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()

"""LLM: the offline API. Batch generation over a list of prompts, or chat.

    from pagedllm import LLM, SamplingParams
    llm = LLM()                                # the default SmolLM2 model
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.engine.beam_search import BeamSearchOutput
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.logging_utils import configure_logging
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

PromptType = str | list[int] | dict  # dict: vLLM's TextPrompt {"prompt"} or TokensPrompt {"prompt_token_ids"}


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        configure_logging()  # start-up phases and warnings on stderr, as vLLM's LLM shows them
        self._engine: LLMEngine | None = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("this LLM has been shut down; build a new LLM to generate again")
        return self._engine

    # ---- life ----------------------------------------------------------------
    def shutdown(self) -> None:
        """Free the model, the KV cache and the CUDA graphs now (idempotent); the LLM is unusable after.

        A notebook can then build a second LLM in the same process: nothing of this
        one stays on the GPU. ``del llm`` and leaving a ``with LLM(...)`` block do the same.
        """
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is None:
            return
        engine.abort_request(list(engine.requests))
        del engine  # the last reference: the model and its caches go with it (cycles too, below)
        _release_memory()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down already
            pass

    def get_tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs in prompt order.

        ``lora_request``: one adapter for every prompt, or one per prompt (None: the base model)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("priority must have one entry per prompt")
        if lora_request is None or not isinstance(lora_request, Sequence):
            lora_list = [lora_request] * len(prompt_list)
        elif len(lora_request) != len(prompt_list):
            raise ValueError("lora_request must be one LoRARequest or have one entry per prompt")
        else:
            lora_list = list(lora_request)
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                if params.output_kind != "final_only":  # offline: only finished outputs are wanted
                    params = params.clone()
                    params.output_kind = "final_only"
                req_id = str(next(self._counter))
                self.engine.add_request(req_id, prompt, params, priority=priority[i] if priority else 0,
                                        lora_request=lora_list[i])
                ids.append(req_id)
        except ValueError:
            self.engine.abort_request(ids)  # all or nothing: no earlier prompt stays queued
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template."""
        from pagedllm.engine.chat_utils import apply_chat_template

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: PromptType | dict | Sequence[PromptType | dict],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's `LLM.beam_search`); sequences best first."""
        if isinstance(prompts, (str, dict)) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        ids: list[str] = []
        try:
            for prompt in prompts:
                if isinstance(prompt, dict):
                    prompt = prompt.get("prompt_token_ids") or prompt.get("prompt")
                req_id = str(next(self._counter))
                self.engine.add_beam_search_request(req_id, prompt, params)
                ids.append(req_id)
            while self.engine.has_unfinished_requests():
                self.engine.step()
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return [self.engine.beam_search.pop_output(i) for i in ids]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


def _release_memory() -> None:
    """Collect reference cycles (modules hold some) and hand cached GPU blocks back to the driver."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    """Give freed host memory back to the OS (glibc keeps large freed blocks in its heap otherwise:
    after the first free its mmap threshold rises, so the next engine's tensors come from the heap)."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [_from_prompt_dict(prompts)]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a string, a list of strings, or token-id lists")
    return [_from_prompt_dict(p) if isinstance(p, (str, dict)) else list(p) for p in prompts]


def _from_prompt_dict(prompt: str | dict) -> str | list[int]:
    """vLLM's ``TextPrompt`` / ``TokensPrompt`` dicts: ``{"prompt": str}`` or ``{"prompt_token_ids": [int]}``."""
    if isinstance(prompt, str):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of ints)")


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({n}), got {len(params)}")
    return list(params)

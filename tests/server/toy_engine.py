"""A tiny deterministic stand-in for LLMEngine, for unit tests of AsyncEngine and the protocol layer.

It implements LLMEngine's public API (add_request / step / abort_request /
has_unfinished_requests / get_stats) over a character tokenizer: token id =
ASCII code, and each step appends, to every sequence, the character after the
last one (wrapping within printable ASCII). So every output is predictable
without a model. The end-to-end tests use the real engine and model, never this.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams

FIRST, LAST = 32, 126  # printable ASCII


class CharTokenizer:
    chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def __len__(self) -> int:
        return 128

    def apply_chat_template(self, conversation, chat_template=None, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")


def next_char(token_id: int) -> int:
    return FIRST if token_id >= LAST else token_id + 1


def expected_text(prompt: str, num_tokens: int) -> str:
    """What the toy engine generates for ``prompt``: the characters after its last one."""
    out, last = [], ord(prompt[-1])
    for _ in range(num_tokens):
        last = next_char(last)
        out.append(chr(last))
    return "".join(out)


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput] = field(default_factory=list)
    priority: int = 0


class ToyEngine:
    def __init__(self, max_model_len: int = 64, step_delay: float = 0.001) -> None:
        self.tokenizer = CharTokenizer()
        self.model_config = SimpleNamespace(model="toy", max_model_len=max_model_len, hf_config=None)
        self.step_delay = step_delay
        self.fail_next_steps = 0
        self.step_gate: threading.Event | None = None  # if given, each step waits until it is set
        self.step_entered = threading.Event()  # set when a step starts
        self.fail_add_ids: set[str] = set()  # add_request raises RuntimeError (not a ValueError) for these
        self.requests: dict[str, _Req] = {}
        self.added: list[_Req] = []  # every request ever added, finished ones too (what reached the engine)
        self.aborted: list[str] = []
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.thread_ids: set[int] = set()  # which threads touched the engine: must be exactly one

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0, lora_request: object = None) -> None:
        self.thread_ids.add(threading.get_ident())
        if lora_request is not None:
            raise ValueError("the toy engine runs no LoRA adapters")
        if request_id in self.fail_add_ids:
            raise RuntimeError(f"toy engine cannot add {request_id}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if any(not 0 <= t < 128 for t in ids):
            raise ValueError("prompt token id out of vocabulary")
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        if len(ids) + (params.max_tokens or 0) > self.model_config.max_model_len:
            raise ValueError("prompt plus max_tokens exceeds max_model_len")
        outputs = [CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                    [] if params.logprobs is not None else None) for i in range(params.n)]
        self.requests[request_id] = _Req(request_id, ids, params, outputs, priority)
        self.added.append(self.requests[request_id])
        self.num_prompt_tokens += len(ids)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.step_entered.set()
        if self.step_gate is not None:
            self.step_gate.wait()
        time.sleep(self.step_delay)
        if self.fail_next_steps:
            self.fail_next_steps -= 1
            raise RuntimeError("toy engine failure")
        results = []
        for req in list(self.requests.values()):
            for out in req.outputs:
                if out.finish_reason is None:
                    self._append(req, out)
            finished = all(o.finish_reason for o in req.outputs)
            results.append(RequestOutput(req.request_id, None, req.prompt_ids, req.outputs, finished))
            if finished:
                del self.requests[req.request_id]
        return results

    def _append(self, req: _Req, out: CompletionOutput) -> None:
        last = out.token_ids[-1] if out.token_ids else req.prompt_ids[-1]
        token = next_char(last)
        out.token_ids.append(token)  # in place, like an engine that reuses its lists
        out.text += chr(token)
        self.num_generation_tokens += 1
        if out.logprobs is not None:
            out.logprobs.append({token: Logprob(-0.5, 1, chr(token)), next_char(token): Logprob(-1.5, 2, None)})
            out.cumulative_logprob -= 0.5
        for stop in req.params.stop:
            if stop in out.text:
                out.text = out.text[: out.text.index(stop)]
                out.finish_reason, out.stop_reason = "stop", stop
                return
        if len(out.token_ids) >= req.params.max_tokens:
            out.finish_reason = "length"

    def abort_request(self, request_ids) -> None:
        self.thread_ids.add(threading.get_ident())
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> SimpleNamespace:
        return SimpleNamespace(num_running=len(self.requests), num_waiting=0,
                               kv_cache_usage=min(1.0, len(self.requests) / 10), num_preemptions=0,
                               prefix_cache_queries=0, prefix_cache_hits=0,
                               num_prompt_tokens=self.num_prompt_tokens,
                               num_generation_tokens=self.num_generation_tokens, num_free_blocks=10,
                               num_total_blocks=10)

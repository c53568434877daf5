"""LLMEngine: the synchronous engine. add_request / step / abort.

    add_request ─► tokenize, validate, fan out n samples ─► Scheduler.add_request
    step        ─► Scheduler.schedule ─► Executor.execute_model ─► Scheduler.update_from_output
                ─► detokenize incrementally, stop strings ─► RequestOutput (cumulative)

Text lives here (tokenizer, detokenizer, stop strings); the scheduler below sees
only token ids.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.config import EngineArgs, ModelConfig
from pagedllm.core.outputs import LogprobsLists, RequestUpdate
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.beam_search import BeamSearchManager
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks held by requests
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # cumulative tokens
    prefix_cache_hits: int
    num_prompt_tokens: int  # cumulative
    num_generation_tokens: int
    num_free_blocks: int
    num_total_blocks: int


@dataclass
class _Sample:
    """One sequence of a request (n > 1 fans out into several)."""

    index: int
    req_id: str  # the scheduler's id: the parent's for n == 1, else "{index}_{parent}"
    detok: IncrementalDetokenizer | None  # None with skip_tokenizer_init
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    arrival_time: float
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from pagedllm.executor.executor import UniProcExecutor
        from pagedllm.loader import load_tokenizer, resolve_model

        self.args = args
        self.model_config: ModelConfig = args.model_config()
        resolve_model(self.model_config)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(self.model_config)
        self.cache_config = args.cache_config()
        self.scheduler_config = args.scheduler_config(self.model_config.max_model_len)
        self.executor = UniProcExecutor(self.model_config, self.cache_config, self.scheduler_config,
                                        args.device_config())
        num_blocks = self.executor.determine_num_blocks()
        num_cpu_blocks = 0
        if self.scheduler_config.preemption_mode == "swap":
            num_cpu_blocks = int(self.cache_config.swap_space * (1 << 30) // self.executor.kv_cache_bytes_per_block())
        self.executor.initialize_cache(num_blocks, num_cpu_blocks)
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config, num_blocks, num_cpu_blocks)
        config_eos = _as_id_set(getattr(self.model_config.hf_config, "eos_token_id", None))
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else min(config_eos, default=None)
        self.extra_eos_ids = (config_eos | _generation_config_eos_ids(self.model_config.model)) - {self.eos_token_id}
        self.vocab_size = self.model_config.hf_config.vocab_size
        self.requests: dict[str, _RequestState] = {}
        self._sample_of: dict[str, tuple[_RequestState, _Sample]] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.beam_search = BeamSearchManager(self)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ---- requests ----------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_text, prompt_ids = self._prompt_ids(prompt)
        arrival_time = arrival_time if arrival_time is not None else time.time()
        state = _RequestState(request_id, prompt_text, prompt_ids, params, [], arrival_time)
        children = []
        for i in range(params.best_of):
            child_params = self._child_params(params, i)
            req_id = request_id if params.best_of == 1 else f"{i}_{request_id}"
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params) if self.tokenizer else None
            sample = _Sample(i, req_id, detok, logprobs=[] if params.logprobs is not None else None,
                             cumulative_logprob=0.0 if child_params.logprobs is not None else None)
            state.samples.append(sample)
            children.append(Request(req_id, prompt_ids, child_params, self.eos_token_id, arrival_time, priority))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        added = []
        try:
            for req in children:
                # Samples after the first share its prompt KV (fork) instead of recomputing it.
                self.scheduler.add_request(req, fork_from=added[0] if added else None)
                added.append(req.request_id)
        except ValueError:
            self.scheduler.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            for rid in added:
                self.scheduler.free_finished(rid)
            raise
        self.requests[request_id] = state
        for sample in state.samples:
            self._sample_of[sample.req_id] = (state, sample)

    def add_beam_search_request(self, request_id: str, prompt: str | list[int], params: BeamSearchParams) -> None:
        """Queue a beam search; its result appears in `self.beam_search` when done."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        _, prompt_ids = self._prompt_ids(prompt)
        self.scheduler.check_length(len(prompt_ids), params.max_tokens)
        self.beam_search.add(request_id, prompt_ids, params)

    def tokenize(self, text: str) -> list[int]:
        """Prompt text to token ids, the one way every entry point does it (special tokens as the model adds them)."""
        if self.tokenizer is None:
            raise ValueError("prompt must be token ids: the engine runs without a tokenizer (skip_tokenizer_init)")
        return self.tokenizer.encode(text)

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
            if not ids:
                raise ValueError("prompt must not be empty")
            return prompt, ids
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token id {t!r} is not an integer in [0, {self.vocab_size})")
        return None, list(prompt)

    def _child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        child = params.clone()
        child.n = child.best_of = 1
        if params.seed is not None:
            child.seed = params.seed + index
        if params.best_of > params.n and child.logprobs is None:
            child.logprobs = 0  # best_of ranks samples by cumulative logprob
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.extra_eos_ids | ({self.eos_token_id} if self.eos_token_id is not None else set())
        child.all_stop_token_ids = stop_ids
        return child

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            if self.beam_search.abort(rid):
                continue
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            ids = [s.req_id for s in state.samples]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            for sid in ids:
                self.scheduler.free_finished(sid)
                self._sample_of.pop(sid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or any(g.output is None for g in self.beam_search.groups.values())

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            return []
        runner_out = self.executor.execute_model(sched_out)
        updates = self.scheduler.update_from_output(sched_out, runner_out)
        touched: dict[str, _RequestState] = {}
        for upd in updates:
            if self.beam_search.owns(upd.req_id):
                self.beam_search.on_update(upd)
                continue
            state, sample = self._sample_of[upd.req_id]
            self._apply_update(state, sample, upd)
            touched[state.request_id] = state
        self.beam_search.advance()
        return [self._make_output(state) for state in touched.values()
                if state.finished or state.params.output_kind != "final_only"]

    def _apply_update(self, state: _RequestState, sample: _Sample, upd: RequestUpdate) -> None:
        if upd.new_prompt_logprobs is not None and state.prompt_logprobs is not None and sample.index == 0:
            state.prompt_logprobs.extend(self._logprob_dicts(upd.new_prompt_logprobs))
        if not upd.new_token_ids:
            return
        if state.first_token_time is None:
            state.first_token_time = time.time()
            state.num_cached_tokens = upd.num_cached_tokens
            self.num_prompt_tokens += len(state.prompt_token_ids)
        self.num_generation_tokens += len(upd.new_token_ids)
        sample.token_ids.extend(upd.new_token_ids)
        if upd.new_logprobs is not None and sample.cumulative_logprob is not None:
            sample.cumulative_logprob += sum(lp[0] for lp in upd.new_logprobs.logprobs)
            if sample.logprobs is not None:
                sample.logprobs.extend(self._logprob_dicts(upd.new_logprobs))
        text_ids = upd.new_token_ids
        stopped_by_token = upd.finish_reason == "stop"
        if stopped_by_token and not state.params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # the EOS / stop token that ended generation is not part of the text
        stop_str = sample.detok.update(text_ids) if sample.detok else None
        if stop_str is not None and not upd.finished:
            self.scheduler.finish_requests(upd.req_id, RequestStatus.FINISHED_STOPPED)
        if stop_str is not None:
            sample.finish_reason, sample.stop_reason = "stop", stop_str
        elif upd.finished:
            sample.finish_reason, sample.stop_reason = upd.finish_reason, upd.stop_reason
        if sample.finish_reason is not None:
            self.scheduler.free_finished(upd.req_id)
            self._sample_of.pop(upd.req_id, None)

    def _logprob_dicts(self, lists: LogprobsLists) -> list[dict[int, Logprob]]:
        out = []
        for ids, lps, rank in zip(lists.token_ids, lists.logprobs, lists.ranks):
            entry = {ids[0]: Logprob(lps[0], rank, self._decode_token(ids[0]))}
            for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
                entry.setdefault(tid, Logprob(lp, r, self._decode_token(tid)))
            out.append(entry)
        return out

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer else ""

    def _make_output(self, state: _RequestState) -> RequestOutput:
        finished = state.finished
        samples = state.samples
        if finished and state.params.best_of > state.params.n:
            samples = sorted(samples, key=lambda s: s.cumulative_logprob or 0.0, reverse=True)[:state.params.n]
        outputs = [
            CompletionOutput(
                index=i if state.params.best_of > state.params.n else s.index,
                text=s.detok.get_next_output_text(s.finish_reason is not None, delta=False) if s.detok else "",
                token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob if state.params.logprobs is not None else None,
                logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for i, s in enumerate(samples)
        ]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if finished:
            self.requests.pop(state.request_id, None)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs, finished,
                             prompt_logprobs=state.prompt_logprobs, num_cached_tokens=state.num_cached_tokens,
                             metrics=metrics)

    # ---- stats -------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            num_preemptions=s.num_preemptions, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks)


def _generation_config_eos_ids(model_path: str | None) -> set[int]:
    """Extra end-of-sequence ids from an HF directory's generation_config.json (Llama 3 lists several)."""
    if not model_path:
        return set()
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return set()
    return _as_id_set(json.loads(path.read_text()).get("eos_token_id"))


def _as_id_set(ids: int | list[int] | None) -> set[int]:
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}

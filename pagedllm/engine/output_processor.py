"""OutputProcessor: the scheduler's per-step ``RequestUpdate`` s in, users' ``RequestOutput`` s out.

It owns everything about a request that is text or presentation, keyed by the
request id the user gave:

    RequestUpdate (token ids, LogprobsLists, finish reason)   one per sequence per step
        │  incremental detokenization, stop strings            (IncrementalDetokenizer)
        │  LogprobsLists -> dict[token id, Logprob]
        ▼
    RequestOutput (cumulative text / ids / logprobs)           one per request per step
        best_of: the n best of the finished samples; final_only: only when finished

The scheduler knows nothing of this state; the processor knows nothing of the
scheduler. What the scheduler must hear back (a sequence stopped by a stop
string, a sequence whose blocks can be freed) is returned in ``ProcessedOutputs``
for the engine to pass on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.outputs import LogprobsLists, RequestUpdate
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class SampleState:
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
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    arrival_time: float
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Sequences a stop string ended: the scheduler still thinks they run.
    stopped_req_ids: list[str]
    # Sequences that finished this step (stopped ones included): their blocks can be freed.
    finished_req_ids: list[str]


class OutputProcessor:
    """Per-request output state: detokenizers, logprobs, cumulative outputs; token counters for stats."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._sample_of: dict[str, tuple[RequestState, SampleState]] = {}
        self.num_prompt_tokens = 0  # cumulative, counted when a request's first token arrives
        self.num_generation_tokens = 0

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float,
                    samples: list[tuple[str, SamplingParams]]) -> None:
        """Track a request whose sequences (scheduler id, per-sequence params) the scheduler accepted."""
        state = RequestState(request_id, prompt, prompt_token_ids, params, [], arrival_time)
        for i, (req_id, child_params) in enumerate(samples):
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params)
                     if self.tokenizer else None)
            state.samples.append(SampleState(
                i, req_id, detok, logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if child_params.logprobs is not None else None))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        self.requests[request_id] = state
        for sample in state.samples:
            self._sample_of[sample.req_id] = (state, sample)

    def abort_request(self, request_id: str) -> list[str] | None:
        """Forget a request; returns its sequences' scheduler ids (None if it is not tracked)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        ids = [s.req_id for s in state.samples]
        for sid in ids:
            self._sample_of.pop(sid, None)
        return ids

    def process(self, updates: list[RequestUpdate]) -> ProcessedOutputs:
        """Apply one step's updates; outputs for the requests they touched (per ``output_kind``)."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        finished: list[str] = []
        for upd in updates:
            state, sample = self._sample_of[upd.req_id]
            self._apply_update(state, sample, upd, stopped)
            if sample.finish_reason is not None:
                finished.append(upd.req_id)
                self._sample_of.pop(upd.req_id, None)
            touched[state.request_id] = state
        outputs = [self._make_output(state) for state in touched.values()
                   if state.finished or state.params.output_kind != "final_only"]
        return ProcessedOutputs(outputs, stopped, finished)

    def _apply_update(self, state: RequestState, sample: SampleState, upd: RequestUpdate,
                      stopped: list[str]) -> None:
        if upd.new_prompt_logprobs is not None and state.prompt_logprobs is not None and sample.index == 0:
            state.prompt_logprobs.extend(self._logprob_dicts(upd.new_prompt_logprobs))
        if not upd.new_token_ids:
            return
        if state.first_token_time is None:
            state.first_token_time = time.time()
            state.num_cached_tokens = upd.num_cached_tokens
            self.num_prompt_tokens += len(state.prompt_token_ids)
        new_ids, new_logprobs = upd.new_token_ids, upd.new_logprobs
        text_ids = new_ids
        if upd.finish_reason == "stop" and not state.params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # the EOS / stop token that ended generation is not part of the text
        num_rendered = sample.detok.num_output_tokens if sample.detok else 0
        stop_str = sample.detok.update(text_ids) if sample.detok else None
        if stop_str is not None:
            # Several tokens in one update (speculative decoding): those after the one that
            # completed the stop string are dropped, as if generation had stopped there.
            num_kept = sample.detok.num_output_tokens - num_rendered
            if num_kept < len(new_ids):
                new_ids = new_ids[:num_kept]
                if new_logprobs is not None:
                    new_logprobs = LogprobsLists(new_logprobs.token_ids[:num_kept],
                                                 new_logprobs.logprobs[:num_kept], new_logprobs.ranks[:num_kept])
        self.num_generation_tokens += len(new_ids)
        sample.token_ids.extend(new_ids)
        if new_logprobs is not None and sample.cumulative_logprob is not None:
            sample.cumulative_logprob += sum(lp[0] for lp in new_logprobs.logprobs)
            if sample.logprobs is not None:
                sample.logprobs.extend(self._logprob_dicts(new_logprobs))
        if stop_str is not None:
            if not upd.finished:
                stopped.append(upd.req_id)
            sample.finish_reason, sample.stop_reason = "stop", stop_str
        elif upd.finished:
            sample.finish_reason, sample.stop_reason = upd.finish_reason, upd.stop_reason

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

    def _make_output(self, state: RequestState) -> RequestOutput:
        finished = state.finished
        samples = state.samples
        best_of = state.params.best_of > state.params.n
        if finished and best_of:  # best_of ranks the finished samples by cumulative logprob
            samples = sorted(samples, key=lambda s: s.cumulative_logprob or 0.0, reverse=True)[:state.params.n]
        outputs = [
            CompletionOutput(
                index=i if best_of else s.index,
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

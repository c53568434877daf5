"""Beam search inside the engine: beams fork and drop KV blocks through ref counts.

Each live beam is a scheduler request that computes one token per step and then
pauses (keeping its blocks) with the top-K next-token logprobs of its distribution.
Once every beam of a group has paused, the group picks the best K continuations over
all beams, as HF transformers does, forks each surviving continuation from its
parent's blocks (full blocks shared, a partial last block copied on write) and drops
the parents:

    step t:   beam A [blocks 0 1 2*]   beam B [blocks 0 1 5*]        (* partial)
    pick:     A+x, A+y, B+z
    step t+1: A+x [0 1 7=copy(2)]  A+y [0 1 8=copy(2)]  B+z [0 1 9=copy(5)]; A, B freed

Scoring follows HF `generate(num_beams=...)`: cumulative log-probabilities of the
raw distribution; a finished hypothesis scores sum_logprobs / gen_len**length_penalty;
with early stopping off (HF's default) the search ends once every beam slot is
finished and the best running beam cannot beat the worst finished one.

The manager sees the scheduler only through ``BeamScheduler`` (add, fork, finish,
free), and the rest of the engine not at all: it is given the end-of-sequence ids
and a function that turns a finished beam's token ids into text.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pagedllm.core.outputs import RequestUpdate
from pagedllm.core.request import Request, RequestStatus
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams


class BeamScheduler(Protocol):
    """The scheduler calls beam search makes (``core.scheduler.Scheduler`` implements them)."""

    def add_request(self, request: Request, fork_from: str | None = None) -> None: ...

    def fork_request(self, parent_id: str, child: Request) -> bool: ...

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> object: ...

    def free_finished(self, request_id: str) -> None: ...


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated, as vLLM returns them
    cum_logprob: float
    score: float  # cum_logprob / gen_len ** length_penalty
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first

    def to_request_output(self, request_id: str, prompt_ids: list[int]) -> RequestOutput:
        """The finished search as a ``RequestOutput``: one sample per beam, best first (the server's shape)."""
        n = len(prompt_ids)
        samples = [CompletionOutput(i, s.text or "", s.tokens[n:], s.cum_logprob, None, s.finish_reason)
                   for i, s in enumerate(self.sequences)]
        return RequestOutput(request_id, None, list(prompt_ids), samples, finished=True)


@dataclass
class _Beam:
    req_id: str
    tokens: list[int]  # generated so far
    score: float  # cumulative logprob


@dataclass
class _Group:
    group_id: str
    prompt_ids: list[int]
    params: BeamSearchParams
    running: list[_Beam]
    pending: dict[str, RequestUpdate] = field(default_factory=dict)
    finished: list[tuple[float, list[int], float]] = field(default_factory=list)  # (score, tokens, cum)
    num_generated: int = 0
    output: BeamSearchOutput | None = None


class BeamSearchManager:
    """Beam search groups over a ``BeamScheduler``; ``decode`` renders a finished beam's text (None: no text)."""

    def __init__(self, scheduler: BeamScheduler, eos_ids: Iterable[int],
                 decode: Callable[[list[int]], str | None]) -> None:
        self.scheduler = scheduler
        self.eos_ids = set(eos_ids)
        self.decode = decode
        self.groups: dict[str, _Group] = {}
        self.beam_to_group: dict[str, str] = {}
        self._ids = itertools.count()

    def add(self, group_id: str, prompt_ids: list[int], params: BeamSearchParams) -> None:
        if group_id in self.groups:
            raise ValueError(f"request_id {group_id!r} is already in use")
        group = _Group(group_id, list(prompt_ids), params, running=[])
        beam = self._start_beam(group, [], 0.0)
        self.scheduler.add_request(self._request(beam, group))
        self.groups[group_id] = group

    def _num_candidates(self, params: BeamSearchParams) -> int:
        n_eos = 0 if params.ignore_eos else len(self.eos_ids)
        return max(2, 1 + n_eos) * params.beam_width

    def _start_beam(self, group: _Group, tokens: list[int], score: float) -> _Beam:
        beam = _Beam(f"{group.group_id}-beam{next(self._ids)}", tokens, score)
        group.running.append(beam)
        self.beam_to_group[beam.req_id] = group.group_id
        return beam

    def _request(self, beam: _Beam, group: _Group) -> Request:
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        params.logprobs = self._num_candidates(group.params)  # internal: may exceed the user-facing cap of 20
        req = Request(beam.req_id, group.prompt_ids + beam.tokens, params, None)
        req.pause_after_sample = True
        return req

    def owns(self, req_id: str) -> bool:
        return req_id in self.beam_to_group

    def has_unfinished_groups(self) -> bool:
        return any(g.output is None for g in self.groups.values())

    def on_update(self, upd: RequestUpdate) -> bool:
        """Take a beam's update; False if the update is not a beam's (it belongs to a user request)."""
        group_id = self.beam_to_group.get(upd.req_id)
        if group_id is None:
            return False
        if upd.new_token_ids:
            self.groups[group_id].pending[upd.req_id] = upd
        return True

    def advance(self) -> list[str]:
        """Step every group whose beams have all reported; returns ids of groups that finished."""
        done = []
        for group in list(self.groups.values()):
            if group.output is None and all(b.req_id in group.pending for b in group.running):
                self._select(group)
                if group.output is not None:
                    done.append(group.group_id)
        return done

    def _select(self, group: _Group) -> None:
        p = group.params
        width, k = p.beam_width, self._num_candidates(p)
        candidates = []  # (cumulative score, parent beam, token, token logprob)
        for beam in group.running:
            lp = group.pending[beam.req_id].new_logprobs
            for tid, val in zip(lp.token_ids[0][1:], lp.logprobs[0][1:]):
                candidates.append((beam.score + val, beam, tid))
        candidates.sort(key=lambda c: c[0], reverse=True)
        candidates = candidates[:k]
        gen_len = group.num_generated + 1

        def hits_stop(tid: int) -> bool:
            return (not p.ignore_eos and tid in self.eos_ids) or gen_len >= p.max_tokens

        for score, beam, tid in candidates[:width]:  # only the top `width` may finish (HF)
            if hits_stop(tid):
                group.finished.append((score / gen_len ** p.length_penalty, beam.tokens + [tid], score))
        group.finished.sort(key=lambda f: f[0], reverse=True)
        del group.finished[width:]
        survivors = [c for c in candidates if not hits_stop(c[2])][:width]
        group.num_generated = gen_len
        parents, group.running, group.pending = group.running, [], {}
        try:
            if survivors and not self._can_stop_early(group, survivors[0][0]):
                for score, beam, tid in survivors:
                    self._fork(group, beam, tid, score)
            else:
                self._finish(group)
        finally:
            self._drop(parents)  # the parents' blocks go back even if a fork failed

    def _can_stop_early(self, group: _Group, best_running: float) -> bool:
        if len(group.finished) < group.params.beam_width:
            return False
        best_possible = best_running / group.num_generated ** group.params.length_penalty
        return best_possible <= group.finished[-1][0]

    def _fork(self, group: _Group, parent: _Beam, token: int, score: float) -> None:
        child = self._start_beam(group, parent.tokens + [token], score)
        req = self._request(child, group)
        if not self.scheduler.fork_request(parent.req_id, req):
            self.scheduler.add_request(req)  # no block free for the copy: recompute (prefix cache may help)

    def _drop(self, beams: list[_Beam]) -> None:
        ids = [b.req_id for b in beams]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_STOPPED)
        for rid in ids:
            self.scheduler.free_finished(rid)
            self.beam_to_group.pop(rid, None)

    def _finish(self, group: _Group) -> None:
        seqs = []
        for score, tokens, cum in group.finished:
            text = self.decode(tokens)
            reason = "stop" if tokens and tokens[-1] in self.eos_ids and not group.params.ignore_eos else "length"
            seqs.append(BeamSearchSequence(group.prompt_ids + tokens, cum, score, text, reason))
        group.output = BeamSearchOutput(seqs)

    def pop_output(self, group_id: str) -> BeamSearchOutput:
        group = self.groups.pop(group_id)
        return group.output

    def abort(self, group_id: str) -> bool:
        group = self.groups.pop(group_id, None)
        if group is None:
            return False
        self._drop(group.running)
        return True

"""OutputProcessor and BeamSearchManager on fake inputs: no model, no scheduler, microseconds."""

from __future__ import annotations

import pytest

from pagedllm.core.outputs import LogprobsLists, RequestUpdate
from pagedllm.core.request import Request, RequestStatus
from pagedllm.engine.beam_search import BeamSearchManager
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.sampling_params import BeamSearchParams, SamplingParams


def _lp(token: int, logprob: float) -> LogprobsLists:
    return LogprobsLists([[token, token]], [[logprob, logprob]], [1])


def _add(proc: OutputProcessor, request_id: str, params: SamplingParams) -> list[str]:
    ids = [request_id if params.best_of == 1 else f"{i}_{request_id}" for i in range(params.best_of)]
    children = []
    for _ in ids:
        child = params.clone()
        child.n = child.best_of = 1
        child.logprobs = 0 if child.logprobs is None else child.logprobs
        children.append(child)
    proc.add_request(request_id, None, [1, 2, 3], params, 0.0, list(zip(ids, children)))
    return ids


def test_best_of_returns_the_n_best_finished_samples_once_all_finish() -> None:
    proc = OutputProcessor(tokenizer=None)
    ids = _add(proc, "r", SamplingParams(n=1, best_of=3, max_tokens=1))
    first = proc.process([RequestUpdate(ids[0], [5], _lp(5, -2.0), finish_reason="length")])
    assert first.request_outputs[0].finished is False and first.finished_req_ids == [ids[0]]
    last = proc.process([RequestUpdate(ids[1], [6], _lp(6, -0.5), finish_reason="length"),
                         RequestUpdate(ids[2], [7], _lp(7, -1.0), finish_reason="length")])
    (out,) = last.request_outputs
    assert out.finished and [c.token_ids for c in out.outputs] == [[6]] and out.outputs[0].index == 0
    assert out.outputs[0].cumulative_logprob is None  # the user asked for no logprobs
    assert not proc.requests and proc.num_prompt_tokens == 3 and proc.num_generation_tokens == 3


def test_final_only_outputs_only_when_finished_and_abort_forgets() -> None:
    proc = OutputProcessor(tokenizer=None)
    (rid,) = _add(proc, "r", SamplingParams(max_tokens=2, output_kind="final_only"))
    assert proc.process([RequestUpdate(rid, [5])]).request_outputs == []
    done = proc.process([RequestUpdate(rid, [6], finish_reason="stop", stop_reason=6)])
    assert done.request_outputs[0].outputs[0].token_ids == [5, 6]
    assert done.request_outputs[0].outputs[0].stop_reason == 6 and done.stopped_req_ids == []
    _add(proc, "q", SamplingParams(max_tokens=2))
    assert proc.abort_request("q") == ["q"] and proc.abort_request("q") is None and not proc.requests


class FakeScheduler:
    """A BeamScheduler that records calls; forks always find blocks."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.forked: list[tuple[str, str]] = []
        self.finished: list[str] = []
        self.freed: list[str] = []

    def add_request(self, request: Request, fork_from: str | None = None) -> None:
        self.added.append(request.request_id)

    def fork_request(self, parent_id: str, child: Request) -> bool:
        self.forked.append((parent_id, child.request_id))
        return True

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        self.finished.extend([request_ids] if isinstance(request_ids, str) else request_ids)

    def free_finished(self, request_id: str) -> None:
        self.freed.append(request_id)


def test_beam_search_talks_only_to_its_beam_scheduler() -> None:
    sched = FakeScheduler()
    beams = BeamSearchManager(sched, eos_ids={0}, decode=lambda ids: "-".join(map(str, ids)))
    beams.add("g", [1, 2], BeamSearchParams(beam_width=2, max_tokens=1))
    (root,) = sched.added
    candidates = LogprobsLists([[9, 9, 8, 7, 6]], [[-0.1, -0.1, -0.2, -0.3, -0.4]], [1])
    assert beams.on_update(RequestUpdate(root, [9], candidates)) and not beams.on_update(RequestUpdate("x", [1]))
    assert beams.advance() == ["g"] and not beams.has_unfinished_groups()
    out = beams.pop_output("g")
    assert [s.tokens for s in out.sequences] == [[1, 2, 9], [1, 2, 8]]
    assert [s.text for s in out.sequences] == ["9", "8"] and out.sequences[0].finish_reason == "length"
    assert sched.finished == [root] == sched.freed and not beams.beam_to_group


def test_beam_search_abort_frees_every_beam_of_the_group() -> None:
    sched = FakeScheduler()
    beams = BeamSearchManager(sched, eos_ids={0}, decode=str)
    beams.add("g", [1, 2], BeamSearchParams(beam_width=2, max_tokens=3))
    (root,) = sched.added
    assert beams.abort("g") is True and beams.abort("g") is False and beams.abort("unknown") is False
    assert sched.finished == [root] == sched.freed
    assert not beams.has_unfinished_groups() and not beams.beam_to_group


def test_sample_logprobs_key_the_sampled_token_with_its_rank_and_the_top_k_with_theirs() -> None:
    proc = OutputProcessor(tokenizer=None)
    (rid,) = _add(proc, "r", SamplingParams(max_tokens=2, logprobs=2))
    # The sampled token 9 is ranked 3rd; the top 2 are 4 and 5. Then a step where the sampled token is the top 1.
    steps = LogprobsLists([[9, 4, 5], [4, 4, 8]], [[-2.0, -0.5, -1.0], [-0.1, -0.1, -3.0]], [3, 1])
    out = proc.process([RequestUpdate(rid, [9, 4], steps, finish_reason="length")]).request_outputs[0].outputs[0]
    assert [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in out.logprobs] == [
        {9: (-2.0, 3), 4: (-0.5, 1), 5: (-1.0, 2)},
        {4: (-0.1, 1), 8: (-3.0, 2)},
    ]
    assert out.cumulative_logprob == pytest.approx(-2.1)


def test_beam_ending_on_eos_finishes_with_stop() -> None:
    sched = FakeScheduler()
    beams = BeamSearchManager(sched, eos_ids={0}, decode=str)
    beams.add("g", [1, 2], BeamSearchParams(beam_width=1, max_tokens=3))
    (root,) = sched.added
    assert beams.on_update(RequestUpdate(root, [0], LogprobsLists([[0, 0, 5]], [[-0.1, -0.1, -3.0]], [1])))
    assert beams.advance() == ["g"]
    (best,) = beams.pop_output("g").sequences
    assert best.tokens == [1, 2, 0] and best.finish_reason == "stop"


def test_beam_search_request_needs_beam_search_params() -> None:
    from pagedllm.engine.llm_engine import LLMEngine

    # The type check comes first, so no engine is needed to see it.
    with pytest.raises(ValueError, match="params must be a BeamSearchParams, got SamplingParams"):
        LLMEngine.add_beam_search_request(None, "r", [1, 2], SamplingParams())

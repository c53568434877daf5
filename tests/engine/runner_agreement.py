"""The check that the scheduler and the model runner agree on every request (engine tests, one worker)."""

from __future__ import annotations

from pagedllm.engine.llm_engine import LLMEngine


def assert_runner_agrees(engine: LLMEngine) -> None:
    """Between steps: each id has at most one runner row, and each row belongs to a request the
    scheduler runs (or a paused beam) or to one whose finish the next step sends; a running
    request's row holds its tokens plus one reserved slot per output placeholder (async
    scheduling: the step in flight samples it). A row that outlives its request is found by
    the next request that reuses the id."""
    sched = engine.scheduler
    runner = engine.executor.worker.model_runner
    ib = runner.input_batch
    ids = [r for r in ib.req_ids if r is not None]
    assert len(set(ids)) == len(ids) == ib.num_reqs, f"two rows under one id: {ids}"
    assert all(ib.req_ids[row] == req_id for req_id, row in ib.req_id_to_row.items())
    live = {r.request_id for r in sched.running} | set(sched.paused)
    assert set(ids) <= live | sched._finished_since_last_step, f"rows outlived their requests: {ids}"
    for req in sched.running:
        row = ib.req_id_to_row[req.request_id]
        assert ib.num_tokens[row] == req.num_tokens + req.num_output_placeholders, (req, ib.num_tokens[row])
    if runner._pending is not None:
        assert set(runner._pending.index) <= set(ids)

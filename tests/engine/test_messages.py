"""Every message between the AsyncEngine front end and the engine loop is plain picklable data."""

from __future__ import annotations

import pickle

import pytest

from pagedllm.engine.engine_loop import EngineDeadError, EngineStepError
from pagedllm.engine.llm_engine import EngineStats
from pagedllm.engine.messages import (
    AbortRequest,
    AddRequest,
    AddResult,
    RequestOutputs,
    RequestRecord,
    RequestRecords,
    RequestsEnded,
    Shutdown,
    StatsSnapshot,
)
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import SamplingParams


def _output() -> RequestOutput:
    sample = CompletionOutput(0, "Paris", [42, 7], -1.5, [{42: Logprob(-0.5, 1, "Par")}, {7: Logprob(-1.0, 2, "is")}],
                              finish_reason="stop", stop_reason=".")
    return RequestOutput("r1", "The capital is", [1, 2, 3], [sample], True, prompt_logprobs=[None],
                         num_cached_tokens=16, metrics={"arrival_time": 1.0})


MESSAGES = [
    AddRequest("r1", [1, 2, 3], SamplingParams(n=2, temperature=0.7, stop=["."], logprobs=3), 1, 12.5),
    AbortRequest(["r1", "r2"]),
    Shutdown(),
    AddResult("r1"),
    AddResult("r1", ValueError("max_tokens must be at least 1")),
    RequestOutputs([_output()]),
    RequestsEnded(["r1"]),
    RequestsEnded(["r1"], EngineStepError("the engine failed")),
    RequestsEnded(["r1"], EngineDeadError("the engine was shut down")),
    RequestRecords([RequestRecord("r1", 3.0, num_prompt_tokens=3), RequestRecord("r1", 4.0, 2, True, "stop")]),
    StatsSnapshot(EngineStats(1, 2, 0.5, 0, 10, 5, 30, 40, 7, 8)),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_pickle(message) -> None:
    copy = pickle.loads(pickle.dumps(message))
    assert type(copy) is type(message)
    if isinstance(message, (AddResult, RequestsEnded)) and message.error is not None:
        assert type(copy.error) is type(message.error) and str(copy.error) == str(message.error)
        assert copy.request_ids == message.request_ids if isinstance(message, RequestsEnded) else True
    else:
        assert copy == message

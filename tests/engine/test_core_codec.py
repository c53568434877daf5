"""The msgpack wire format between API servers and the engine core process (engine/core_codec.py)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pagedllm.engine import messages as m
from pagedllm.engine.core_codec import ClientDecoder, EngineEncoder
from pagedllm.engine.engine_loop import EngineDeadError, EngineStepError
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from tests.engine.test_messages import MESSAGES


def _pair(*request_ids: str, params: SamplingParams | None = None) -> tuple[EngineEncoder, ClientDecoder]:
    enc, dec = EngineEncoder(), ClientDecoder()
    for rid in request_ids:  # the front end registers a request when it sends its add
        enc.decode_command(dec.encode_command(m.AddRequest(rid, [1, 2, 3], params or SamplingParams())))
    return enc, dec


@pytest.mark.parametrize("message", MESSAGES, ids=lambda x: type(x).__name__)
def test_every_message_crosses_the_wire(message) -> None:
    enc, dec = _pair("r1")
    if isinstance(message, (m.AddRequest, m.AbortRequest, m.Shutdown)):
        copy = enc.decode_command(dec.encode_command(message))
    else:
        copy = dec.decode(enc.encode(message))
    assert type(copy) is type(message)
    error = getattr(message, "error", None)
    if error is not None:
        assert type(copy.error) is type(error) and str(copy.error) == str(error)
    elif isinstance(message, m.RequestOutputs):  # the prompt text stays with the front end
        assert copy.outputs == [dataclasses.replace(o, prompt=None) for o in message.outputs]
    else:
        assert copy == message


def test_sampling_params_arrive_whole_with_their_stop_id_set() -> None:
    params = SamplingParams(n=2, best_of=3, temperature=0.5, stop=["x"], stop_token_ids=[7], seed=-5, logprobs=2)
    params.all_stop_token_ids = {7, 2}
    enc, dec = EngineEncoder(), ClientDecoder()
    copy = enc.decode_command(dec.encode_command(m.AddRequest("a", [5], params, 3, 1.5)))
    assert copy == m.AddRequest("a", [5], params, 3, 1.5)
    assert copy.params.all_stop_token_ids == {7, 2}


@pytest.mark.parametrize("params", [
    SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}), logit_bias={5: -2.0},
                   allowed_token_ids=[3, 4, 5], bad_words=["no"], prompt_logprobs=1),
    SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
    BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5),
], ids=["constraints", "choice", "beam"])
def test_constraints_and_beam_search_params_cross(params) -> None:
    """Structured outputs, token constraints and beam search reach the engine process unchanged."""
    enc, dec = EngineEncoder(), ClientDecoder()
    copy = enc.decode_command(dec.encode_command(m.AddRequest("a", [5], params)))
    assert type(copy.params) is type(params) and copy.params == params


def _step(n: int, finished: bool = False, text: str | None = None) -> RequestOutput:
    ids = list(range(10, 10 + n))
    lps = [{t: Logprob(-0.1 * t, 1, str(t))} for t in ids]
    seq = CompletionOutput(0, text if text is not None else "".join(f"<{t}>" for t in ids), ids, -0.5 * n, lps,
                           "length" if finished else None)
    return RequestOutput("r1", None, [1, 2, 3], [seq], finished, prompt_logprobs=[None, {2: Logprob(-1.0, 1)}],
                         num_cached_tokens=2)


def test_outputs_travel_as_deltas_and_come_back_cumulative() -> None:
    enc, dec = _pair("r1")
    sizes = []
    for n in range(1, 40):
        data = enc.encode(m.RequestOutputs([_step(n)]))
        sizes.append(len(data))
        assert dec.decode(data).outputs == [_step(n)]
    assert sizes[-1] <= sizes[1] + 8  # a step costs the new token, not the whole sequence so far
    last = enc.encode(m.RequestOutputs([_step(40, finished=True)]))
    assert len(last) <= sizes[1] + 16  # the finish too (its logprobs are not sent again)
    assert dec.decode(last).outputs == [_step(40, True)]
    # Finished: both ends forgot it; a late output for it is dropped, not resurrected.
    assert dec.decode(enc.encode(m.RequestOutputs([_step(41)]))).outputs == []


def test_text_that_is_not_an_extension_is_sent_whole() -> None:
    enc, dec = _pair("r1")
    dec.decode(enc.encode(m.RequestOutputs([_step(3, text="Hello wor")])))
    revised = _step(4, text="Hello, world")  # e.g. a detokenizer that fixed its previous guess
    assert dec.decode(enc.encode(m.RequestOutputs([revised]))).outputs == [revised]


@pytest.mark.parametrize("params", [SamplingParams(n=1, best_of=2), SamplingParams(n=2, best_of=3)])
def test_best_of_reordering_at_finish_is_rebuilt(params: SamplingParams) -> None:
    enc, dec = _pair("r1", params=params)
    # b's text extends a's but its tokens differ: a delta against a would be wrong.
    a, b = CompletionOutput(0, "ab", [1, 1], -1.0), CompletionOutput(1, "abc", [2, 2, 2], -0.5)
    dec.decode(enc.encode(m.RequestOutputs([RequestOutput("r1", None, [1, 2, 3], [a, b], False)])))
    final = RequestOutput("r1", None, [1, 2, 3], [dataclasses.replace(b, index=0, finish_reason="stop")], True)
    assert dec.decode(enc.encode(m.RequestOutputs([final]))).outputs == [final]


def test_stop_string_trimmed_at_finish_is_rebuilt() -> None:
    enc, dec = _pair("r1")
    dec.decode(enc.encode(m.RequestOutputs([_step(3, text="Hello STO")])))
    final = _step(3, finished=True, text="Hello ")  # the stop string "STOP" cut off the text
    assert dec.decode(enc.encode(m.RequestOutputs([final]))).outputs == [final]


def test_ended_requests_are_forgotten_and_forget_all_names_the_live_ones() -> None:
    enc, dec = _pair("r1", "r2", "r3")
    dec.decode(enc.encode(m.RequestsEnded(["r1"], EngineStepError("boom"))))
    dec.decode(enc.encode(m.AddResult("r2", ValueError("bad"))))
    assert dec.forget_all() == ["r3"]
    assert dec.decode(enc.encode(m.RequestOutputs([_step(1)]))).outputs == []


def test_unknown_errors_arrive_as_runtime_errors_naming_their_type() -> None:
    enc, dec = _pair()
    ended = dec.decode(enc.encode(m.RequestsEnded(["x"], KeyError("k"))))
    assert type(ended.error) is RuntimeError and "KeyError" in str(ended.error)
    dead = dec.decode(enc.encode(m.RequestsEnded(["x"], EngineDeadError("gone"))))
    assert type(dead.error) is EngineDeadError


@pytest.mark.parametrize("data", [b"", b"\xc1", pickle.dumps(m.Shutdown()), b"\x92\x63\x00", b"\x01", b"\x90",
                                  b"\x91\x00", b"\x92\x04\x01"])
def test_malformed_or_pickled_bytes_are_refused(data: bytes) -> None:
    enc, dec = EngineEncoder(), ClientDecoder()
    with pytest.raises(ValueError):
        enc.decode_command(data)
    with pytest.raises(ValueError):
        dec.decode(data)


def test_heartbeat_and_stats_cross() -> None:
    enc, dec = EngineEncoder(), ClientDecoder()
    assert dec.decode(enc.encode(m.EngineHeartbeat(1.5, 42))) == m.EngineHeartbeat(1.5, 42)


def test_stats_with_speculative_decoding_counters_cross() -> None:
    from pagedllm.core.outputs import SpecDecodingStats
    from pagedllm.engine.llm_engine import EngineStats

    spec = SpecDecodingStats(3, 12, 7, [3, 2, 2, 0])
    stats = dataclasses.replace(next(x for x in MESSAGES if isinstance(x, m.StatsSnapshot)).stats, spec_decoding=spec)
    copy = ClientDecoder().decode(EngineEncoder().encode(m.StatsSnapshot(stats)))
    assert isinstance(copy.stats, EngineStats) and copy.stats == stats

"""The wire format between API server processes and the engine core process: msgpack, no pickle.

Each message of ``engine.messages`` travels as one msgpack array ``[kind, ...]``
of plain values (no field names, no class paths). Request outputs travel as
deltas: the engine side (``EngineEncoder``) remembers what it sent of each
sequence (text, token ids, logprobs) and sends only what is new; the front end
(``ClientDecoder``) keeps the sums and rebuilds the same cumulative
``RequestOutput`` s the in-process engine loop hands out. So a decode step costs
a few dozen bytes per request, not the whole text so far; so does the last one
(only a request whose samples best_of or beam search may reorder at the finish
sends its finished output whole). Prompt token ids never
come back: the front end registered them when it sent the ``AddRequest``.

    front end: ClientDecoder.encode_command(AddRequest)  ──►  EngineEncoder.decode_command
    front end: ClientDecoder.decode(bytes)  ◄──  EngineEncoder.encode(RequestOutputs | ...)

Exceptions travel as ``[type name, message]`` and come back as the same class for
the types the server maps to a status (ValueError is a 400, the engine errors
503/500), else as a RuntimeError naming the original type.

Why not pickle: a socket that unpickles runs whatever code its peer sends, and
pickling these dataclasses field by field is slower than packing plain lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from pagedllm.core.outputs import SpecDecodingStats
from pagedllm.engine import messages as m
from pagedllm.engine.engine_loop import EngineDeadError, EngineStepError
from pagedllm.engine.llm_engine import EngineStats
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

ADD, ABORT, SHUTDOWN, ADD_RESULT, OUTPUTS, ENDED, RECORDS, STATS, HEARTBEAT = range(9)
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_BEAM_FIELDS = tuple(f.name for f in dataclasses.fields(BeamSearchParams))
_SAMPLING, _BEAM = 0, 1  # which params an AddRequest carries
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))
_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (ValueError, TypeError, EngineDeadError, EngineStepError, RuntimeError)
}


def _lora_out(lora_request: LoRARequest | None) -> list | None:
    if lora_request is None:
        return None
    return [lora_request.lora_name, lora_request.lora_int_id, lora_request.lora_path]


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> list:
    try:
        wire = msgpack.unpackb(data, strict_map_key=False, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"malformed engine message: {e!r}") from e
    if not isinstance(wire, list) or not wire:
        raise ValueError(f"malformed engine message: expected [kind, ...], got {type(wire).__name__}")
    return wire


def _malformed(fn):  # noqa: ANN001, ANN202 - a decorator for the two decode methods
    """A message of the right kind but the wrong shape is a ValueError too, like bytes that do not parse."""

    def decode(*args: Any) -> Any:
        try:
            return fn(*args)
        except (TypeError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(f"malformed engine message: {e!r}") from e

    return decode


def _error_out(error: BaseException | None) -> list[str] | None:
    return None if error is None else [type(error).__name__, str(error)]


def _error_in(wire: list[str] | None) -> BaseException | None:
    if wire is None:
        return None
    name, message = wire
    cls = _ERRORS.get(name)
    return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")


def _logprobs_out(entries: list[dict[int, Logprob] | None]) -> list[dict[int, list] | None]:
    return [None if e is None else {t: [lp.logprob, lp.rank, lp.decoded_token] for t, lp in e.items()}
            for e in entries]


def _logprobs_in(entries: list[dict[int, list] | None]) -> list[dict[int, Logprob] | None]:
    return [None if e is None else {t: Logprob(*v) for t, v in e.items()} for e in entries]


def _params_in(wire: list[Any]) -> SamplingParams | BeamSearchParams:
    # No __init__ / __post_init__: the sender's object was already validated; rebuilt field by field.
    kind, values = wire
    if kind == _BEAM:
        return BeamSearchParams(**dict(zip(_BEAM_FIELDS, values)))
    params = SamplingParams.__new__(SamplingParams)
    params.__dict__.update(zip(_PARAM_FIELDS, values))
    params.all_stop_token_ids = set(params.all_stop_token_ids)
    if params.structured_outputs is not None:
        params.structured_outputs = StructuredOutputsParams(**params.structured_outputs)
    return params


def _params_out(params: SamplingParams | BeamSearchParams) -> list[Any]:
    if isinstance(params, BeamSearchParams):
        return [_BEAM, [getattr(params, name) for name in _BEAM_FIELDS]]
    values = {name: getattr(params, name) for name in _PARAM_FIELDS}
    values["all_stop_token_ids"] = list(values["all_stop_token_ids"])  # a set
    if params.structured_outputs is not None:
        values["structured_outputs"] = dataclasses.asdict(params.structured_outputs)
    return [_SAMPLING, [values[name] for name in _PARAM_FIELDS]]


def _stats_out(stats: EngineStats) -> list[Any]:
    values = {name: getattr(stats, name) for name in _STATS_FIELDS}
    if stats.spec_decoding is not None:  # a dataclass of counters: sent as a dict
        values["spec_decoding"] = dataclasses.asdict(stats.spec_decoding)
    return [values[name] for name in _STATS_FIELDS]


def _stats_in(values: list[Any]) -> EngineStats:
    stats = EngineStats(*values)
    if stats.spec_decoding is not None:
        stats.spec_decoding = SpecDecodingStats(**stats.spec_decoding)
    return stats


@dataclasses.dataclass
class _SentSequence:
    """What the engine side already sent of one sequence (engine side of the delta)."""

    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0


class EngineEncoder:
    """The engine process's end: decodes commands, encodes messages (outputs as deltas)."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, _SentSequence]] = {}
        # Requests whose finished samples may come back reordered (best_of > n keeps the n best, beam
        # search ranks its beams): their finished output goes whole. Others finish with a delta too.
        self._reordered: set[str] = set()

    @_malformed
    def decode_command(self, data: bytes) -> m.EngineCommand:
        wire = _unpack(data)
        kind = wire[0]
        if kind == ADD:
            _, rid, prompt_ids, params, priority, arrival, lora = wire
            lora_request = LoRARequest(*lora) if lora is not None else None
            params = _params_in(params)
            if isinstance(params, BeamSearchParams) or params.best_of > params.n:
                self._reordered.add(rid)
            return m.AddRequest(rid, prompt_ids, params, priority, arrival, lora_request)
        if kind == ABORT:
            return m.AbortRequest(wire[1])
        if kind == SHUTDOWN:
            return m.Shutdown()
        raise ValueError(f"unknown engine command kind {kind!r}")

    def encode(self, message: m.EngineMessage) -> bytes:
        match message:
            case m.RequestOutputs():
                return _pack([OUTPUTS, [self._output(o) for o in message.outputs]])
            case m.RequestRecords():
                return _pack([RECORDS, [[r.request_id, r.time, r.num_new_tokens, r.finished, r.finish_reason,
                                         r.num_prompt_tokens] for r in message.records]])
            case m.AddResult():
                if message.error is not None:
                    self._forget(message.request_id)
                return _pack([ADD_RESULT, message.request_id, _error_out(message.error)])
            case m.RequestsEnded():
                for rid in message.request_ids:
                    self._forget(rid)
                return _pack([ENDED, message.request_ids, _error_out(message.error)])
            case m.StatsSnapshot():
                return _pack([STATS, _stats_out(message.stats)])
            case m.EngineHeartbeat():
                return _pack([HEARTBEAT, message.stalled_for, message.pid, message.model])
        raise TypeError(f"cannot send a {type(message).__name__} from the engine")

    def _output(self, output: RequestOutput) -> list[Any]:
        first = output.request_id not in self._sent
        sent = self._sent.setdefault(output.request_id, {})
        # A sample whose text was trimmed (a stop string) or revised goes whole by itself (_completion).
        full = output.finished and output.request_id in self._reordered
        completions = [self._completion(c, sent, full) for c in output.outputs]
        if output.finished:
            self._forget(output.request_id)
        prompt_logprobs = _logprobs_out(output.prompt_logprobs) if output.prompt_logprobs and first else None
        return [output.request_id, output.finished, output.num_cached_tokens, output.metrics or None,
                prompt_logprobs, completions]

    def _forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
        self._reordered.discard(request_id)

    @staticmethod
    def _completion(c: CompletionOutput, sent: dict[int, _SentSequence], full: bool) -> list[Any]:
        s = sent.get(c.index)
        if full or s is None or not c.text.startswith(s.text) or len(c.token_ids) < s.num_tokens:
            s = sent[c.index] = _SentSequence()
            replace = True
        else:
            replace = False
        logprobs = c.logprobs
        delta_lp = None if logprobs is None else _logprobs_out(logprobs[s.num_logprobs:])
        wire = [c.index, replace, c.text[len(s.text):], c.token_ids[s.num_tokens:], c.cumulative_logprob,
                delta_lp, c.finish_reason, c.stop_reason]
        s.text, s.num_tokens, s.num_logprobs = c.text, len(c.token_ids), 0 if logprobs is None else len(logprobs)
        return wire


@dataclasses.dataclass
class _Sequence:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None


@dataclasses.dataclass
class _Request:
    prompt_token_ids: list[int]
    prompt_logprobs: list | None = None
    sequences: dict[int, _Sequence] = dataclasses.field(default_factory=dict)


class ClientDecoder:
    """A front end's end: encodes commands, decodes messages (summing output deltas per request)."""

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}

    def encode_command(self, command: m.EngineCommand) -> bytes:
        match command:
            case m.AddRequest():
                self._requests[command.request_id] = _Request(list(command.prompt_token_ids))
                return _pack([ADD, command.request_id, command.prompt_token_ids, _params_out(command.params),
                              command.priority, command.arrival_time, _lora_out(command.lora_request)])
            case m.AbortRequest():
                return _pack([ABORT, command.request_ids])
            case m.Shutdown():
                return _pack([SHUTDOWN])
        raise TypeError(f"cannot send a {type(command).__name__} to the engine")

    def forget_all(self) -> list[str]:
        """The requests in flight (sent and not ended), forgotten: the engine will say no more of them."""
        request_ids = list(self._requests)
        self._requests.clear()
        return request_ids

    @_malformed
    def decode(self, data: bytes) -> m.EngineMessage:
        wire = _unpack(data)
        kind = wire[0]
        if kind == OUTPUTS:
            return m.RequestOutputs([o for o in map(self._output, wire[1]) if o is not None])
        if kind == RECORDS:
            return m.RequestRecords([m.RequestRecord(*r) for r in wire[1]])
        if kind == ADD_RESULT:
            if wire[2] is not None:
                self._requests.pop(wire[1], None)
            return m.AddResult(wire[1], _error_in(wire[2]))
        if kind == ENDED:
            for rid in wire[1]:
                self._requests.pop(rid, None)
            return m.RequestsEnded(wire[1], _error_in(wire[2]))
        if kind == STATS:
            return m.StatsSnapshot(_stats_in(wire[1]))
        if kind == HEARTBEAT:
            return m.EngineHeartbeat(wire[1], wire[2], wire[3])
        raise ValueError(f"unknown engine message kind {kind!r}")

    def _output(self, wire: list[Any]) -> RequestOutput | None:
        rid, finished, num_cached, metrics, prompt_logprobs, completions = wire
        request = self._requests.get(rid)
        if request is None:  # not ours any more (aborted here, its last outputs still on the way)
            return None
        if prompt_logprobs is not None:
            request.prompt_logprobs = _logprobs_in(prompt_logprobs)
        outputs = [self._completion(request, c) for c in completions]
        if finished:
            del self._requests[rid]
        return RequestOutput(rid, None, request.prompt_token_ids, outputs, finished, request.prompt_logprobs,
                             num_cached, metrics or {})

    @staticmethod
    def _completion(request: _Request, wire: list[Any]) -> CompletionOutput:
        index, replace, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason = wire
        seq = request.sequences.get(index)
        if replace or seq is None:
            seq = request.sequences[index] = _Sequence()
        seq.text += text
        seq.token_ids.extend(token_ids)
        if logprobs is not None:
            seq.logprobs = (seq.logprobs or []) + _logprobs_in(logprobs)
        # Copies: the consumer may still read this output while the next delta arrives.
        return CompletionOutput(index, seq.text, list(seq.token_ids), cumulative_logprob,
                                None if seq.logprobs is None else list(seq.logprobs), finish_reason, stop_reason)

"""Messages between the AsyncEngine front end (event loop) and the engine loop: plain picklable data.

    front end ── AddRequest / AbortRequest / Shutdown ──────────────────────►  engine loop
              ◄── AddResult / RequestOutputs / RequestsEnded / RequestRecords / StatsSnapshot ──

Nothing here holds a future, a queue, an event loop or a callable: the front end
keeps its reply channels (pending adds, per-request streams) on its own side,
keyed by request id. So the engine loop can later move to its own process with
these messages on the wire unchanged: ``engine/core_codec.py`` packs them with
msgpack between the API server and the engine core process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

# ---- front end -> engine ------------------------------------------------------------


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | BeamSearchParams  # BeamSearchParams: the engine's beam search, one final output
    priority: int = 0
    arrival_time: float = 0.0  # time.monotonic() when the front end received it, for latency metrics
    lora_request: LoRARequest | None = None  # the adapter it runs with; None: the base model


@dataclass
class AbortRequest:
    request_ids: list[str]


@dataclass
class Shutdown:
    """Stop the engine loop; requests in flight fail, later commands are refused."""


EngineCommand = AddRequest | AbortRequest | Shutdown

# ---- engine -> front end ------------------------------------------------------------


@dataclass
class AddResult:
    """The answer to one ``AddRequest``: accepted (error None) or rejected (a ValueError is a 400)."""

    request_id: str
    error: BaseException | None = None


@dataclass
class RequestOutputs:
    """One step's outputs: copies, so the engine may keep appending to its own lists."""

    outputs: list[RequestOutput]


@dataclass
class RequestsEnded:
    """Requests the engine dropped: aborted (error None) or failed with ``error``."""

    request_ids: list[str]
    error: BaseException | None = None


@dataclass
class RequestRecord:
    """What happened to one request at one time, for latency metrics (times are ``time.monotonic``).

    A request's first record is its add (``num_prompt_tokens`` set, ``time`` its
    arrival); then one per step that gave it tokens; the last has ``finished``.
    """

    request_id: str
    time: float
    num_new_tokens: int = 0  # summed over the request's n sequences
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int | None = None


@dataclass
class RequestRecords:
    records: list[RequestRecord] = field(default_factory=list)


@dataclass
class StatsSnapshot:
    stats: Any  # the engine's EngineStats after the latest pass of its loop


@dataclass
class EngineHeartbeat:
    """The engine process is alive: sent to every front end twice a second (engine/core_proc.py).

    ``stalled_for`` is ``EngineLoop.stalled_for()`` when it was sent; a front end
    that hears nothing for a few seconds declares the engine dead. ``model`` is the
    engine's resolved model as JSON (``max_model_len`` and the HF config's fields):
    a front end takes it from the first heartbeat instead of importing torch to
    build a transformers config itself.
    """

    stalled_for: float = 0.0
    pid: int = 0
    model: str = ""


EngineMessage = AddResult | RequestOutputs | RequestsEnded | RequestRecords | StatsSnapshot | EngineHeartbeat

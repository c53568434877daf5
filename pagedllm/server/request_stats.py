"""Per-request latency bookkeeping: the engine's ``RequestRecord`` s in, ``RequestTiming`` s out.

The engine loop reports plain records (a request was added, got tokens, finished);
``RequestStatsTracker`` turns them into one ``RequestTiming`` per request (time to
first token, inter-token latencies, end-to-end latency) and tells its
``StatsListener`` s, such as the server's Prometheus metrics. It lives here, in
server/, because only the server wants it: the engine never imports server/.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pagedllm.engine.messages import RequestRecord

logger = logging.getLogger(__name__)


@dataclass
class RequestTiming:
    """Per-request timestamps (``time.monotonic``) and token counts, for latency metrics."""

    request_id: str
    arrival_time: float
    num_prompt_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0  # summed over the request's n sequences
    num_decode_steps: int = 0  # steps that produced tokens (sequences decode in lockstep)
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean decode time per token after the first (None with fewer than two token steps)."""
        if self.num_decode_steps < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_decode_steps - 1)


class StatsListener(Protocol):
    """Called where the engine's records arrive (the engine thread); must be thread-safe and quick."""

    def on_first_token(self, timing: RequestTiming) -> None: ...

    def on_inter_token(self, timing: RequestTiming) -> None:
        """New tokens after the first: ``timing.inter_token_latencies[-1]`` is the latest gap."""

    def on_request_finished(self, timing: RequestTiming) -> None: ...


class RequestStatsTracker:
    """Keeps a ``RequestTiming`` per request in flight; register ``on_records`` with the AsyncEngine."""

    def __init__(self, listeners: Iterable[StatsListener] = ()) -> None:
        self.listeners = list(listeners)
        self._timings: dict[str, RequestTiming] = {}

    def on_records(self, records: list[RequestRecord]) -> None:
        for record in records:
            if record.num_prompt_tokens is not None:  # the add: its time is the arrival time
                self._timings[record.request_id] = RequestTiming(record.request_id, record.time,
                                                                 record.num_prompt_tokens)
                continue
            timing = self._timings.get(record.request_id)
            if timing is None:
                continue
            if record.num_new_tokens:
                self._on_tokens(timing, record)
            if record.finished:
                del self._timings[record.request_id]
                timing.finished_time = record.time
                timing.finish_reason = record.finish_reason
                self._notify("on_request_finished", timing)

    def _on_tokens(self, timing: RequestTiming, record: RequestRecord) -> None:
        timing.num_generation_tokens += record.num_new_tokens
        timing.num_decode_steps += 1
        if timing.first_token_time is None:
            timing.first_token_time = record.time
            self._notify("on_first_token", timing)
        else:
            timing.inter_token_latencies.append(record.time - timing.last_token_time)
            self._notify("on_inter_token", timing)
        timing.last_token_time = record.time

    def _notify(self, method: str, timing: RequestTiming) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, method)(timing)
            except Exception:  # metrics must never break generation
                logger.exception("stats listener %s.%s failed", type(listener).__name__, method)

"""What a benchmark reports: per-request timings in, percentiles and rates out."""

from __future__ import annotations

from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """mean and p50/p90/p99 of ``values`` (seconds in, milliseconds out)."""
    ms = [1e3 * v for v in values]
    out = {"mean": sum(ms) / len(ms) if ms else float("nan")}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    return out


@dataclass
class RequestTiming:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    start: float
    prompt_len: int
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    output_tokens: int = 0  # from the final usage (or the chunk count)
    end: float = 0.0
    error: str | None = None


@dataclass
class ServeResult:
    num_requests: int
    num_failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    first_error: str | None = None

    @property
    def request_throughput(self) -> float:
        return (self.num_requests - self.num_failed) / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s


def serve_result(timings: list[RequestTiming], duration_s: float) -> ServeResult:
    ok = [t for t in timings if t.error is None and t.token_times]
    ttft = [t.token_times[0] - t.start for t in ok]
    # TPOT: per request, the time after the first token over the tokens after it (vLLM's definition).
    tpot = [(t.end - t.token_times[0]) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    return ServeResult(
        num_requests=len(timings), num_failed=len(timings) - len(ok), duration_s=duration_s,
        input_tokens=sum(t.prompt_len for t in ok), output_tokens=sum(t.output_tokens for t in ok),
        ttft_ms=summarize(ttft), tpot_ms=summarize(tpot), itl_ms=summarize(itl),
        e2e_ms=summarize([t.end - t.start for t in ok]),
        first_error=next((t.error or "no tokens streamed" for t in timings if t not in ok), None))

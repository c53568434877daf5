"""Prometheus metrics under vLLM's names, with the ``pagedllm:`` prefix instead of ``vllm:``.

So an existing vLLM dashboard needs only the prefix changed. Two sources:
- engine state (requests running / waiting, KV cache usage, cumulative token,
  preemption and prefix-cache counters) is read from the AsyncEngine's latest
  ``EngineStats`` snapshot at scrape time, by a custom collector; the engine
  loop refreshes that snapshot after every step and once a second while idle,
  and two gauges read at scrape time need no step at all: requests in flight
  as the front end counts them, and the engine loop's stall time (seconds busy
  without progress, what ``/health`` judges);
- per-request latencies (TTFT, inter-token, per output token, end to end) and
  finished-request counts are observed as requests progress: the AsyncEngine's
  records go through a ``RequestStatsTracker`` (server/request_stats.py), which
  calls this module's ``StatsListener`` hooks (on the engine thread;
  prometheus_client is thread-safe).
Every app gets its own ``CollectorRegistry``, so tests can build several.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.request_stats import RequestStatsTracker, RequestTiming

PREFIX = "pagedllm:"

# vLLM's buckets.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class _EngineStatsCollector(Collector):
    """Gauges and cumulative counters read from the engine's latest stats snapshot at scrape time."""

    GAUGES = (
        ("num_requests_running", "num_running", "Number of requests in model execution batches."),
        ("num_requests_waiting", "num_waiting", "Number of requests waiting to be processed."),
        ("kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
        ("gpu_cache_usage_perc", "kv_cache_usage", "KV-cache usage (vLLM's older name). 1 means 100 percent."),
    )
    COUNTERS = (
        ("prompt_tokens", "num_prompt_tokens", "Number of prefill tokens processed."),
        ("generation_tokens", "num_generation_tokens", "Number of generation tokens processed."),
        ("num_preemptions", "num_preemptions", "Cumulative number of preemptions from the engine."),
        ("prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in terms of number of tokens."),
        ("prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in terms of number of tokens."),
    )

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.get_stats()
        for name, attr, doc in self.GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, attr, 0) or 0))
            yield family
        live = (("num_requests_in_flight", "Requests accepted and not ended, counted by the server.",
                 self.engine.num_in_flight),
                ("engine_stalled_seconds", "Seconds the engine loop has had work without finishing a step.",
                 self.engine.stalled_for()))
        for name, doc, value in live:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        for name, attr, doc in self.COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(stats, attr, 0) or 0))
            yield family
        yield from self._spec_decoding(getattr(stats, "spec_decoding", None))
        yield from self._lora(stats)

    @staticmethod
    def _lora(stats) -> Iterator[Metric]:  # noqa: ANN001 - EngineStats
        """vLLM's ``lora_requests_info``: the adapters running and waiting as labels (comma-separated),
        the time as the value; nothing with LoRA off."""
        max_lora = getattr(stats, "max_lora", 0)
        if not max_lora:
            return
        family = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                   labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"])
        family.add_metric([",".join(stats.running_lora_adapters), str(max_lora),
                           ",".join(stats.waiting_lora_adapters)], time.time())
        yield family

    # --- speculative decoding ---
    SPEC_COUNTERS = (
        ("spec_decode_num_drafts", "num_drafts", "Number of spec decoding drafts (one request's drafts in a step)."),
        ("spec_decode_num_draft_tokens", "num_draft_tokens", "Number of draft tokens."),
        ("spec_decode_num_accepted_tokens", "num_accepted_tokens", "Number of accepted tokens."),
    )

    def _spec_decoding(self, spec) -> Iterator[Metric]:  # noqa: ANN001 - SpecDecodingStats | None
        """vLLM's spec-decode counters, and accepted tokens per draft position; nothing with speculation off."""
        if spec is None:
            return
        for name, attr, doc in self.SPEC_COUNTERS:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(spec, attr)))
            yield family
        family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                     "Accepted tokens per draft position.", labels=["model_name", "position"])
        for pos, n in enumerate(spec.num_accepted_tokens_per_pos):
            family.add_metric([self.model_name, str(pos)], float(n))
        yield family
    # --- end speculative decoding ---


class ServerMetrics:
    """The app's Prometheus registry; a ``StatsListener`` of the ``RequestStatsTracker`` it registers."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(engine, model_name))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_start_time_seconds, ...
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Histogram of mean time per output token (after the first) per request, in seconds.",
                              ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                             E2E_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed, per request.",
                                       TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Number of generation tokens processed, per request.", TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.tracker = RequestStatsTracker([self])
        engine.add_record_listener(self.tracker.on_records)

    # ---- StatsListener (engine thread) -------------------------------------------
    def on_first_token(self, timing: RequestTiming) -> None:
        if timing.time_to_first_token is not None:
            self.ttft.observe(timing.time_to_first_token)

    def on_inter_token(self, timing: RequestTiming) -> None:
        self.itl.observe(timing.inter_token_latencies[-1])

    def on_request_finished(self, timing: RequestTiming) -> None:
        if timing.time_per_output_token is not None:
            self.tpot.observe(timing.time_per_output_token)
        if timing.e2e_latency is not None:
            self.e2e.observe(timing.e2e_latency)
        self.prompt_tokens.observe(timing.num_prompt_tokens)
        self.generation_tokens.observe(timing.num_generation_tokens)
        self.success.labels(self.model_name, timing.finish_reason or "unknown").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

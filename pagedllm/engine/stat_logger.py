"""What the engine says in its log as it runs: a line per request, and stats every few seconds (vLLM's lines).

    INFO ... [stat_logger] Received request cmpl-3f2a: prompt 17 tokens: 'Hello, my name is', params: ...
    INFO ... [stat_logger] Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s,
             Running: 4 reqs, Waiting: 0 reqs, KV cache usage: 3.1%, Prefix cache hit rate: 42.0%

Off with ``--disable-log-requests`` / ``--disable-log-stats`` (the offline ``LLM`` is quiet by default).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

# Seconds between stats lines, as vLLM's default; $PAGEDLLM_LOG_STATS_INTERVAL changes it (tests use 0.5).
STATS_INTERVAL_S = 5.0


def log_request(request_id: str, prompt: str | None, prompt_ids: list[int], params: Any,
                max_log_len: int | None) -> None:
    """One line: id, prompt length (and text, cut at ``max_log_len`` characters), sampling parameters."""
    shown = ""
    if prompt is not None:
        text = prompt if max_log_len is None else prompt[:max_log_len]
        shown = f": {text!r}" + ("..." if max_log_len is not None and len(prompt) > max_log_len else "")
    logger.info("Received request %s: prompt %d tokens%s, params: %s", request_id, len(prompt_ids), shown, params)


class StatLogger:
    """Throughput since the last line, queue lengths and KV use, logged at most every ``interval`` seconds."""

    def __init__(self, interval: float | None = None) -> None:
        if interval is None:
            interval = float(os.environ.get("PAGEDLLM_LOG_STATS_INTERVAL", STATS_INTERVAL_S))
        self.interval = interval
        self.last_time = time.monotonic()
        self.last_prompt_tokens = self.last_generation_tokens = 0
        self.last_queries = self.last_hits = 0

    def maybe_log(self, stats: Any) -> bool:
        """Log a line if ``interval`` has passed since the last one; ``stats`` is an ``EngineStats``."""
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed < self.interval:
            return False
        prompt_tps = (stats.num_prompt_tokens - self.last_prompt_tokens) / elapsed
        gen_tps = (stats.num_generation_tokens - self.last_generation_tokens) / elapsed
        queries = stats.prefix_cache_queries - self.last_queries
        hit_rate = (stats.prefix_cache_hits - self.last_hits) / queries if queries else 0.0
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    prompt_tps, gen_tps, stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                    100 * hit_rate)
        self.last_time = now
        self.last_prompt_tokens, self.last_generation_tokens = stats.num_prompt_tokens, stats.num_generation_tokens
        self.last_queries, self.last_hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        return True

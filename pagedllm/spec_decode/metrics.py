"""The acceptance-rate log line of speculative decoding (the counters are core/outputs.SpecDecodingStats).

Every ``interval_s`` (and only when drafts were verified since the last line) the
engine logs what happened in that interval, as vLLM's SpecDecodingLogging does:

    speculative decoding: acceptance rate 62.5%, mean accepted length 3.50, 40 drafts, 160 draft tokens,
    100 accepted, per position [0.90, 0.70, 0.50, 0.40]
"""

from __future__ import annotations

import logging
import time

from pagedllm.core.outputs import SpecDecodingStats

logger = logging.getLogger("pagedllm.spec_decode")


class SpecDecodingLogger:
    """Logs the interval's acceptance figures from cumulative ``SpecDecodingStats``."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = SpecDecodingStats()
        self._last_time = time.monotonic()

    def maybe_log(self, stats: SpecDecodingStats, now: float | None = None) -> str | None:
        """Log (and return) the line for the interval since the last one, if it is due and not empty."""
        now = time.monotonic() if now is None else now
        if now - self._last_time < self.interval_s or stats.num_drafts == self._last.num_drafts:
            return None
        last = self._last
        num_drafts = stats.num_drafts - last.num_drafts
        num_draft_tokens = stats.num_draft_tokens - last.num_draft_tokens
        num_accepted = stats.num_accepted_tokens - last.num_accepted_tokens
        per_pos = [n - (last.num_accepted_tokens_per_pos[i] if i < len(last.num_accepted_tokens_per_pos) else 0)
                   for i, n in enumerate(stats.num_accepted_tokens_per_pos)]
        line = (f"speculative decoding: acceptance rate {100.0 * num_accepted / max(num_draft_tokens, 1):.1f}%, "
                f"mean accepted length {1.0 + num_accepted / num_drafts:.2f}, {num_drafts} drafts, "
                f"{num_draft_tokens} draft tokens, {num_accepted} accepted, per position "
                f"[{', '.join(f'{n / num_drafts:.2f}' for n in per_pos)}]")
        logger.info(line)
        self._last, self._last_time = stats.copy(), now
        return line

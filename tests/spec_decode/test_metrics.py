"""Speculative-decoding counters and the interval log line."""

from __future__ import annotations

import logging

import pytest

from pagedllm.core.outputs import SpecDecodingStats
from pagedllm.spec_decode.metrics import SpecDecodingLogger


def test_counters_by_position() -> None:
    s = SpecDecodingStats()
    s.observe(4, 2)
    s.observe(2, 2)
    s.observe(4, 0)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (3, 10, 4)
    assert s.num_accepted_tokens_per_pos == [2, 2, 0, 0]
    assert s.acceptance_rate == pytest.approx(0.4)
    assert s.mean_accepted_length == pytest.approx(1 + 4 / 3)


def test_log_line_covers_the_interval_only(caplog: pytest.LogCaptureFixture) -> None:
    log = SpecDecodingLogger(interval_s=10.0)
    s = SpecDecodingStats()
    s.observe(4, 4)
    with caplog.at_level(logging.INFO, logger="pagedllm.spec_decode"):
        assert log.maybe_log(s, now=log._last_time + 1) is None  # not due yet
        first = log.maybe_log(s, now=log._last_time + 11)
        assert "acceptance rate 100.0%" in first and "mean accepted length 5.00" in first
        assert log.maybe_log(s, now=log._last_time + 30) is None  # no new drafts: nothing to say
        s.observe(4, 1)
        second = log.maybe_log(s, now=log._last_time + 11)
    assert "acceptance rate 25.0%" in second and "1 drafts" in second and "[1.00, 0.00, 0.00, 0.00]" in second
    assert [r.getMessage() for r in caplog.records] == [first, second]

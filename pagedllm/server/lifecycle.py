"""The server process's life: health verdict, graceful drain on SIGTERM, exit on engine death.

    SIGTERM / SIGINT (first)   stop accepting: new requests and /health get 503
                               wait until no request is in flight, at most --shutdown-timeout s
                               abort the rest (their streams end with finish_reason "abort")
                               uvicorn closes the connections, waiting at most GRACE_S for
                               clients that stopped reading, then cancels them   -> exit 0
    SIGTERM / SIGINT (second)  force: uvicorn exits at once                      -> exit 0
    engine loop dead           pending requests already failed by the loop       -> exit 1
                               (unless --no-exit-on-engine-death: keep answering 503)

All of it runs in uvicorn's own ``on_tick`` (every 0.1 s on the event loop), so
there is no extra thread or task to orphan.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn

from pagedllm.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

# How long uvicorn waits for responses still being written after the drain; a client that
# stopped reading holds its connection open, and must not hold the process.
GRACE_S = 3.0


@dataclass(frozen=True)
class LifecycleConfig:
    health_stall_timeout: float = 60.0  # /health fails once the engine is busy this long without progress
    shutdown_timeout: float = 30.0  # SIGTERM: drain at most this long, then abort
    exit_on_engine_death: bool = True  # exit 1 so a supervisor restarts the process


def health_problem(engine: AsyncEngine, stall_timeout: float) -> str | None:
    """Why the server should not get traffic now, or None when it is healthy."""
    if engine.is_dead:
        try:
            engine.check_health()
        except Exception as e:
            return str(e)
    if not engine.accepting:
        return "the server is shutting down"
    stalled = engine.stalled_for()
    if stalled > stall_timeout:
        return f"the engine has made no progress for {stalled:.0f} s with work pending"
    return None


class PagedServer(uvicorn.Server):
    """A uvicorn server that drains the engine on SIGTERM and exits when the engine dies."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, lifecycle: LifecycleConfig) -> None:
        super().__init__(config)
        self.engine = engine
        self.lifecycle = lifecycle
        self.exit_code = 0
        self.drain_deadline: float | None = None
        self._death_seen = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it re-raises the signal after serving, which would end the process with
        # -SIGTERM instead of 0 once the drain is done.
        if self.drain_deadline is None and not self.should_exit:
            self.start_drain()
        else:
            logger.warning("second signal %d: exiting now", sig)
            self.should_exit = self.force_exit = True

    def start_drain(self) -> None:
        logger.info("shutting down: accepting no new requests, draining %d in flight for at most %.0f s",
                    self.engine.num_in_flight, self.lifecycle.shutdown_timeout)
        self.engine.stop_accepting()
        self.drain_deadline = time.monotonic() + self.lifecycle.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.engine.is_dead and not self._death_seen:
            self._death_seen = True
            if self.drain_deadline is None:
                return self._on_engine_death()
        if self.drain_deadline is not None:
            return self._drain_tick()
        return False

    def _on_engine_death(self) -> bool:
        if not self.lifecycle.exit_on_engine_death:
            logger.error("the engine is dead; serving 503 until restarted (--no-exit-on-engine-death)")
            return False
        logger.error("the engine is dead: exiting with status 1 so that a supervisor restarts the server")
        self.exit_code = 1
        self.config.timeout_graceful_shutdown = GRACE_S
        return True

    def _drain_tick(self) -> bool:
        assert self.drain_deadline is not None  # only called while draining
        if self.engine.num_in_flight == 0:
            logger.info("drained: no request in flight")
        elif time.monotonic() >= self.drain_deadline:
            logger.warning("shutdown timeout: aborting %d requests still in flight", self.engine.abort_all())
        else:
            return False
        self.config.timeout_graceful_shutdown = GRACE_S
        return True

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

``ServeProcesses`` decides which processes ``pagedllm serve`` runs:

    default                 this process (HTTP, tokenize, detokenized text, SSE) + the engine core process
    --api-server-count N    + N-1 more HTTP front ends, started by this one, on the same port (SO_REUSEPORT);
                            each talks to the one engine process; SIGTERM/SIGINT here drains them all
    --engine-in-process     the engine on a thread of this process (debugging; the layout before issue 10)

The engine process and the extra front ends exit when this process dies
(``die_with_parent``), so no orphan holds the port or the GPU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from pagedllm.config import EngineArgs
from pagedllm.engine.async_engine import AsyncEngine

if TYPE_CHECKING:
    from pagedllm.engine.core_client import EngineCoreProcess

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

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, lifecycle: LifecycleConfig,
                 front_ends: list[subprocess.Popen] | None = None) -> None:
        super().__init__(config)
        self.engine = engine
        self.lifecycle = lifecycle
        self.front_ends = front_ends or []  # the other HTTP front ends (--api-server-count), started here
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
        for proc in self.front_ends:  # they drain their own requests meanwhile
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
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
        dead = [proc for proc in self.front_ends if proc.poll() is not None]
        if dead:
            logger.error("front end process %d exited with %s: exiting with status 1", dead[0].pid,
                         dead[0].returncode)
            self.exit_code = 1
            self.start_drain()
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


class ServeProcesses:
    """The processes of one ``pagedllm serve``: start them, hand out this process's engine, end them."""

    def __init__(self, argv: list[str], engine_args: EngineArgs, api_server_count: int = 1,
                 engine_in_process: bool = False, front_end_of: str | None = None) -> None:
        if engine_in_process and api_server_count > 1:
            raise ValueError("--api-server-count > 1 needs the engine in its own process (drop --engine-in-process)")
        self.argv = argv
        self.engine_args = engine_args
        self.api_server_count = api_server_count
        self.engine_in_process = engine_in_process
        self.front_end_of = json.loads(front_end_of) if front_end_of else None  # set in front ends 1..N-1
        self.core = None  # the EngineCoreProcess, in the process that started it
        self.front_ends: list[subprocess.Popen] = []

    def start_engine(self, max_waiting_requests: int | None) -> AsyncEngine:
        """This process's AsyncEngine; in the first front end, also the engine and the other front ends."""
        from pagedllm.engine.core_client import EngineCoreProcess
        from pagedllm.engine.core_proc import CoreAddresses, die_with_parent

        if self.engine_in_process:
            return AsyncEngine.from_engine_args(self.engine_args, max_waiting_requests)
        if self.front_end_of is not None:
            info = self.front_end_of
            die_with_parent(info["parent_pid"])
            addresses = CoreAddresses(info["input"], tuple(info["outputs"]))
            engine = AsyncEngine.from_engine_core(self.engine_args, addresses, info["index"], info["engine_pid"],
                                                  None, max_waiting_requests)
            os.write(info["ready_fd"], b"1")  # the first front end waits for this before it serves
            os.close(info["ready_fd"])
            return engine
        self.core = core = EngineCoreProcess(self.engine_args, self.api_server_count)
        try:
            engine = AsyncEngine.from_engine_core(self.engine_args, core.addresses, 0, core.pid, core,
                                                  max_waiting_requests)
            self._start_front_ends(core)
        except BaseException:
            for proc in [*self.front_ends, core.process]:
                proc.kill()
            core.shutdown(0)
            raise
        return engine

    def _start_front_ends(self, core: EngineCoreProcess) -> None:
        """Front ends 1..N-1; returns once each has its engine connection, so /health 200 means all serve."""
        for index in range(1, self.api_server_count):
            read_fd, write_fd = os.pipe()
            info = {"index": index, "input": core.addresses.input, "outputs": list(core.addresses.outputs),
                    "engine_pid": core.pid, "parent_pid": os.getpid(), "ready_fd": write_fd}
            cmd = [sys.executable, "-m", "pagedllm.server.api_server", *self.argv, "--front-end-of", json.dumps(info)]
            self.front_ends.append(subprocess.Popen(cmd, pass_fds=(write_fd,)))
            os.close(write_fd)
            with os.fdopen(read_fd, "rb") as ready:
                if ready.read(1) != b"1":  # EOF: it exited before it was ready
                    raise RuntimeError(f"API server {index} exited while starting; its error is in the log above")

    def sockets(self, host: str, port: int) -> list[socket.socket] | None:
        """With several front ends, this one's listening socket on the shared port; else None (uvicorn binds)."""
        if self.api_server_count == 1 and self.front_end_of is None:
            return None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Every front end binds the same port; the kernel spreads new connections over them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        return [sock]

    def shutdown(self, engine: AsyncEngine, timeout: float) -> None:
        """After this server stopped: let the other front ends finish their drain, then stop the engine."""
        deadline = time.monotonic() + timeout
        for proc in self.front_ends:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.front_ends:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        engine.shutdown()

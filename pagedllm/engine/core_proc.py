"""The engine core process: an ``EngineLoop`` (scheduler + executor + output processing) fed over ZeroMQ.

    API server 0 ─┐  PUSH [client index, command]                 engine core process
    API server 1 ─┼──────────────────────────────►  PULL  ── main thread: poll, decode, EngineLoop.send
       ...        │                                             heartbeat to every front end every 0.5 s
                  │  PULL  ◄─── PUSH (one per front end) ── engine thread: EngineLoop emit -> _Router
                  └─ outputs of the requests that front end added; stats and heartbeats to all

The loop is the same ``EngineLoop`` the in-process engine uses; only its
``emit`` differs: ``_Router`` sends each message to the front end that owns the
request (by request id, learnt from the ``AddRequest``), encoded by
``core_codec.EngineEncoder`` (msgpack, outputs as deltas). Output sockets have no
high-water mark: a slow front end never blocks a step, it only queues bytes.

Life: the process ignores SIGINT (a Ctrl-C reaches the whole process group; the
API server decides when the engine stops, by ``Shutdown``), exits on SIGTERM,
and exits by itself when its parent dies (``die_with_parent``). A crash of the
loop fails every request in flight, then the process exits 1, which the front
ends see as a dead engine.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.engine import messages as m
from pagedllm.engine.core_codec import EngineEncoder
from pagedllm.engine.engine_loop import EngineLoop

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CoreAddresses:
    """ZeroMQ endpoints (ipc sockets in a private temporary directory)."""

    input: str  # the engine binds it; every front end connects
    outputs: tuple[str, ...]  # front end i binds outputs[i]; the engine connects
    startup_error_path: str = ""  # where the engine writes why it could not start (type, then message)


def die_with_parent(parent_pid: int) -> None:
    """Exit when ``parent_pid`` dies: SIGTERM from the kernel on Linux, and a polling thread everywhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the thread below is enough
        pass
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()


class _Router:
    """The loop's ``emit``: encodes each message once per front end it concerns and sends it there."""

    def __init__(self, sockets: list) -> None:
        self._sockets = sockets
        self._encoder = EngineEncoder()
        # The main thread decodes each command before the loop sees it (what the encoder learns from an
        # add is in place before that request's first output).
        self.decode_command = self._encoder.decode_command
        self._lock = threading.Lock()  # emit runs on the engine thread, heartbeats on the main thread
        self._owner: dict[str, int] = {}  # request id -> front end index (only with several front ends)
        self._ended: list[str] = []  # forgotten at the next stats snapshot, after their last message

    def register(self, request_id: str, client: int) -> None:
        if len(self._sockets) > 1:
            with self._lock:
                self._owner[request_id] = client

    def emit(self, message: m.EngineMessage) -> None:
        with self._lock:
            if len(self._sockets) == 1:
                self._sockets[0].send(self._encoder.encode(message), copy=False)
                return
            match message:
                case m.RequestOutputs():
                    self._ended.extend(o.request_id for o in message.outputs if o.finished)
                    self._split(message.outputs, lambda o: o.request_id, m.RequestOutputs)
                case m.RequestRecords():
                    self._split(message.records, lambda r: r.request_id, m.RequestRecords)
                case m.RequestsEnded():
                    self._ended.extend(message.request_ids)
                    self._split(message.request_ids, lambda rid: rid, lambda ids: m.RequestsEnded(ids, message.error))
                case m.AddResult():
                    if message.error is not None:
                        self._ended.append(message.request_id)
                    self._send(self._owner.get(message.request_id), message)
                case _:  # stats and heartbeats: everyone; a pass of the loop is over, so forget ended requests
                    for rid in self._ended:
                        self._owner.pop(rid, None)
                    self._ended.clear()
                    data = self._encoder.encode(message)
                    for sock in self._sockets:
                        sock.send(data, copy=False)

    def _split(self, items: Iterable, key, build) -> None:  # noqa: ANN001 - small local helpers
        groups: dict[int | None, list] = {}
        for item in items:
            groups.setdefault(self._owner.get(key(item)), []).append(item)
        for client, group in groups.items():
            self._send(client, build(group))

    def _send(self, client: int | None, message: m.EngineMessage) -> None:
        if client is None:  # a request this process never registered: nobody to tell
            logger.warning("engine message %s for an unknown request", type(message).__name__)
            return
        self._sockets[client].send(self._encoder.encode(message), copy=False)


def run_engine_core(args: EngineArgs, addresses: CoreAddresses, parent_pid: int) -> None:
    """The engine core process's body (``python -m pagedllm.engine.core_proc``, settings on stdin)."""
    import zmq

    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s")
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.bind(addresses.input)
    outputs = []
    for address in addresses.outputs:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)  # the last failures still reach the front ends on exit
        # Connect, not bind: a connecting PUSH queues for a front end that has not started yet, where
        # a bound one with no peer would block the engine thread.
        sock.connect(address)
        outputs.append(sock)
    from pagedllm.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine.from_engine_args(args)
    except Exception as e:  # noqa: BLE001 - a start-up failure goes to the parent, which reports it as one line
        _report_startup_failure(addresses, e)
        sys.exit(1)
    router = _Router(outputs)
    # The loop runs on this (the main) thread, the commands and heartbeats on another: torch's CPU kernels
    # called from a secondary thread ran on 1.3 of 2 cores (docs/CPU.md).
    loop = EngineLoop(engine, router.emit, start=False)
    result: list[int] = []

    def serve() -> None:
        code = 1
        try:
            code = _serve(loop, commands, router, model_facts(engine.model_config))
        except BaseException:  # noqa: BLE001 - a crash here must still end the loop, not leave it unreachable
            logger.exception("the engine process's command thread crashed")
        finally:
            result.append(code)
            if loop.is_alive():  # marked dead, still ticking, or this thread failed: stop it now
                loop.send(m.Shutdown())
        loop.join(10.0)
        if loop.is_alive():  # a step that does not return: exit anyway, as the front ends expect
            logger.error("the engine loop did not stop within 10 s of shutdown: exiting")
            os._exit(code or 1)

    server = threading.Thread(target=serve, name="pagedllm-commands", daemon=True)
    server.start()
    loop.run()
    server.join(10.0)
    code = result[0] if result else 1
    for sock in (commands, *outputs):
        sock.close()
    ctx.term()
    sys.exit(code)


def _report_startup_failure(addresses: CoreAddresses, error: Exception) -> None:
    """Write the error for the parent (``EngineCoreProcess.startup_error``); the traceback only with --debug."""
    from pagedllm.logging_utils import wants_traceback

    if wants_traceback():
        logger.exception("the engine failed to start")
    with open(addresses.startup_error_path, "w", encoding="utf-8") as f:
        f.write(f"{type(error).__name__}\n{error}")


def model_facts(model_config: Any) -> str:
    """What a front end needs of the resolved model (``FrontEndModel.take_engine_facts``), as JSON."""
    return json.dumps({"max_model_len": model_config.max_model_len,
                       "hf_config": json.loads(model_config.hf_config.to_json_string(use_diff=False))})


def _serve(loop: EngineLoop, commands, router: _Router, model: str) -> int:  # noqa: ANN001 - a zmq socket
    """Feed commands to the loop until Shutdown (0) or the loop's death (1); heartbeat meanwhile."""
    import zmq

    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    pid = os.getpid()
    next_beat = 0.0
    while loop.is_alive() and loop.dead is None:  # dead (e.g. a worker died): exit, the front ends see it
        now = time.monotonic()
        if now >= next_beat:  # the first one also tells the front ends the engine is ready
            router.emit(m.EngineHeartbeat(loop.stalled_for(), pid, model))
            next_beat = now + HEARTBEAT_S
        if not poller.poll(HEARTBEAT_S * 1000):
            continue
        client, data = commands.recv_multipart()
        try:
            command = router.decode_command(data)
        except ValueError:
            logger.exception("dropping a malformed command")
            continue
        if isinstance(command, m.AddRequest):
            router.register(command.request_id, client[0])
        loop.send(command)
        if isinstance(command, m.Shutdown):
            return 0
    logger.error("the engine loop died: %r", loop.dead)
    return 1


if __name__ == "__main__":
    import pickle

    # Written once by EngineCoreProcess, our own parent, through a pipe only it holds.
    run_engine_core(*pickle.load(sys.stdin.buffer))

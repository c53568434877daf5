"""The API server's side of the engine core process: launch it, talk to it, notice when it dies.

    EngineCoreProcess(args, num_clients)   starts `python -m pagedllm.engine.core_proc`, owns its life
    EngineCoreClient(addresses, index, emit, ...)
        send(command)      encode (core_codec.ClientDecoder) and PUSH; any thread
        receiver thread    PULL -> decode -> emit(message), the same messages EngineLoop emits
        is_alive / dead / stalled_for / join: what AsyncEngine asks of an EngineLoop

So ``AsyncEngine`` runs unchanged over either an in-process ``EngineLoop`` or
this client. The engine counts as dead when its process exits (checked every
0.25 s by pid) or sends no heartbeat for ``HEARTBEAT_TIMEOUT_S``; then every
request this front end has in flight fails with ``EngineDeadError`` and later
adds are refused at once.

``FrontEndModel`` is what the API server needs of the model without loading it:
the ``ModelConfig`` and the tokenizer (tokenizing stays in this process). It
imports no torch: the model's path and tokenizer it finds itself, its resolved
config and ``max_model_len`` come with the engine's first heartbeat
(``EngineHeartbeat.model``), so both processes agree on them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from pagedllm.config import EngineArgs
from pagedllm.engine import messages as m
from pagedllm.engine.core_codec import ClientDecoder
from pagedllm.engine.core_proc import CoreAddresses
from pagedllm.engine.engine_loop import EngineDeadError

logger = logging.getLogger(__name__)

# No heartbeat for this long (the engine sends one every 0.5 s): the engine is hung or gone.
HEARTBEAT_TIMEOUT_S = 10.0
_POLL_S = 0.25


class FrontEndModel:
    """The model's config and tokenizer, for a front end whose engine runs in another process.

    Imports no torch (the engine process has it): ~200 MB less resident memory per API server process.
    ``model_config.hf_config`` and ``max_model_len`` are the engine's (``take_engine_facts``)."""

    def __init__(self, args: EngineArgs) -> None:
        from pagedllm.loader import load_tokenizer, locate_model

        self.model_config = args.model_config(resolve_quantization=False)
        locate_model(self.model_config)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(self.model_config)

    def take_engine_facts(self, facts: str) -> None:
        """The engine's resolved model (``core_proc.model_facts``): its limit and its config's fields."""
        data = json.loads(facts)
        self.model_config.max_model_len = int(data["max_model_len"])
        self.model_config.hf_config = SimpleNamespace(**data["hf_config"])

    def tokenize(self, text: str) -> list[int]:
        """The same encoding ``LLMEngine.tokenize`` applies."""
        if self.tokenizer is None:
            raise ValueError("prompt must be token ids: the engine runs without a tokenizer (skip_tokenizer_init)")
        return self.tokenizer.encode(text)


class EngineCoreProcess:
    """Starts the engine core process and ends it; ``addresses`` are what its front ends connect to."""

    def __init__(self, args: EngineArgs, num_clients: int = 1) -> None:
        self._dir = tempfile.mkdtemp(prefix="pagedllm-")
        self.addresses = CoreAddresses(f"ipc://{self._dir}/in",
                                       tuple(f"ipc://{self._dir}/out{i}" for i in range(num_clients)),
                                       os.path.join(self._dir, "startup_error"))
        # A fresh interpreter, not fork (a forked copy of a process with torch threads or a CUDA context
        # can hang) and not multiprocessing's spawn (it re-runs the caller's __main__, which a script
        # without a __main__ guard turns into a second server). Its settings come on stdin, once.
        self.process = subprocess.Popen([sys.executable, "-m", "pagedllm.engine.core_proc"], stdin=subprocess.PIPE)
        assert self.process.stdin is not None  # PIPE above
        with self.process.stdin as stdin:
            pickle.dump((args, self.addresses, os.getpid()), stdin)
        self.pid: int = self.process.pid

    def startup_error(self) -> Exception | None:
        """Why the engine could not start, as it reported it (an input error stays a ValueError)."""
        try:
            with open(self.addresses.startup_error_path, encoding="utf-8") as f:
                name, _, message = f.read().partition("\n")
        except OSError:
            return None
        if name in ("ValueError", "FileNotFoundError", "OSError", "NotImplementedError"):
            return ValueError(message)
        return RuntimeError(f"{name}: {message}")

    @property
    def exitcode(self) -> int | None:
        return self.process.returncode

    def is_alive(self) -> bool:
        return self.process.poll() is None  # also reaps it: a zombie is not alive

    def shutdown(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit (after a Shutdown command), then terminate or kill it."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the engine process did not exit within %.0f s: terminating it", timeout)
            self.process.terminate()
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class EngineCoreClient:
    """One front end's connection to the engine core process; the ``EngineLoop`` interface AsyncEngine uses."""

    def __init__(self, addresses: CoreAddresses, index: int, emit: Callable[[m.EngineMessage], None],
                 engine_pid: int, process: EngineCoreProcess | None = None, ready_timeout: float = 600.0) -> None:
        import zmq

        self._emit = emit
        self._index = bytes([index])
        self._process = process  # set in the front end that launched the engine: it alone stops it
        self._engine_pid = engine_pid
        self._codec = ClientDecoder()
        self._lock = threading.Lock()  # the codec's request table and the command socket
        self._ctx = zmq.Context()
        self._commands = self._ctx.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.setsockopt(zmq.LINGER, 1000)
        self._commands.connect(addresses.input)
        self._outputs = self._ctx.socket(zmq.PULL)
        self._outputs.bind(addresses.outputs[index])
        self.dead: BaseException | None = None
        self._stalled_for = 0.0
        self.model_facts: str | None = None  # the engine's first heartbeat fills it (_wait_ready)
        self._heard = time.monotonic()
        self._closed = False
        self._stopping = False
        self._wait_ready(ready_timeout)
        self._thread = threading.Thread(target=self._receive, name="pagedllm-core-client", daemon=True)
        self._thread.start()

    def _wait_ready(self, timeout: float) -> None:
        """Block until the engine's first heartbeat (it has loaded the model; ``model_facts`` its resolved
        model), or fail if it exits first."""
        deadline = time.monotonic() + timeout
        while self.model_facts is None:
            if self._outputs.poll(int(_POLL_S * 1000)):
                self._on_bytes(self._outputs.recv(copy=False).buffer)
                continue
            if not self._engine_running():
                error = self._process.startup_error() if self._process else None
                if error is not None:
                    raise error
                code = self._process.exitcode if self._process else None
                raise RuntimeError(f"the engine process exited while starting (exit code {code}); "
                                   "its error is in the log above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine process was not ready after {timeout:.0f} s")
        self._heard = time.monotonic()

    # ---- the EngineLoop interface ------------------------------------------------
    def send(self, command: m.EngineCommand) -> None:
        if isinstance(command, m.Shutdown):
            if self._process is None:
                self._close()  # another front end owns the engine: only this connection ends
                return
            self._stopping = True  # its exit is expected now: not reported as a death
        with self._lock:
            if self.dead is None:
                self._commands.send_multipart([self._index, self._codec.encode_command(command)], copy=False)
                return
        if isinstance(command, m.AddRequest):  # refused at once, as a stopped EngineLoop does
            self._emit(m.AddResult(command.request_id, EngineDeadError(f"the engine stopped: {self.dead!r}")))

    def is_alive(self) -> bool:
        return self.dead is None

    def stalled_for(self) -> float:
        if self._stalled_for <= 0:
            return 0.0
        return self._stalled_for + (time.monotonic() - self._heard)

    def join(self, timeout: float | None = None) -> None:
        """After a Shutdown: wait for the engine process to exit, then stop receiving."""
        if self._process is not None:
            self._process.shutdown(timeout if timeout is not None else 10.0)
        self._close()
        self._thread.join(timeout)

    # ---- receiving ---------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while not self._closed:
                if self._outputs.poll(int(_POLL_S * 1000)):
                    self._on_bytes(self._outputs.recv(copy=False).buffer)
                elif self._check_dead():
                    return
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("the engine client's receiver crashed")
            self._declare_dead(EngineDeadError(f"lost the engine connection: {e!r}"))

    def _on_bytes(self, data: Any) -> None:
        with self._lock:
            message = self._codec.decode(data)
        self._heard = time.monotonic()
        if isinstance(message, m.EngineHeartbeat):
            self._stalled_for = message.stalled_for
            if self.model_facts is None:
                self.model_facts = message.model
            return
        self._emit(message)

    def _engine_running(self) -> bool:
        if self._process is not None:
            return self._process.is_alive()
        try:
            os.kill(self._engine_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the pid was reused by another user's process
            return False
        return True

    def _check_dead(self) -> bool:
        if self._closed:
            return True
        if not self._engine_running():
            if self._stopping:
                self._declare_dead(EngineDeadError("the engine was shut down"), log=False)
                return True
            code = self._process.exitcode if self._process else None
            self._declare_dead(EngineDeadError(f"the engine process exited (exit code {code})"))
            return True
        silent = time.monotonic() - self._heard
        if silent > HEARTBEAT_TIMEOUT_S:
            self._declare_dead(EngineDeadError(f"the engine process sent no heartbeat for {silent:.0f} s"))
            return True
        return False

    def _declare_dead(self, error: EngineDeadError, log: bool = True) -> None:
        """Fail every request this front end has in flight; adds from now on are refused."""
        if log:
            logger.error("the engine is dead: %s", error)
        with self._lock:
            self.dead = error
            request_ids = self._codec.forget_all()
        for rid in request_ids:  # AsyncEngine fails a pending add or the request's stream alike
            self._emit(m.AddResult(rid, error))

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.dead is None:
                self.dead = EngineDeadError("the engine was shut down")

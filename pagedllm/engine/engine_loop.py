"""EngineLoop: the thread that owns an ``LLMEngine``, applies commands between steps and emits messages.

    send(AddRequest | AbortRequest | Shutdown)          (any thread)
        │  appended under a lock; the loop takes them all between steps
        ▼
    engine thread ("pagedllm-engine"):
        while running:
            apply each command (one dispatch; an error fails that command's requests alone)
            LLMEngine.step()  ─► emit(RequestOutputs), emit(RequestRecords)
            emit(StatsSnapshot)            (also once a second while idle)
            heartbeat = now                 (after each step and each idle wait)

It speaks only in the plain messages of ``engine.messages``, to one ``emit``
callable, so it knows nothing of asyncio and can later run in its own process
with ``emit`` writing to a socket.

Why a dedicated thread rather than an asyncio task that runs ``step()`` in an
executor: the LLMEngine is not thread-safe, and a thread that owns it outright
needs no lock around it (commands are applied between steps, in order); it also
steps back to back without waiting for an event loop. torch releases the GIL
inside its kernels, so the server keeps serving HTTP while a step runs. No
command, and no client action, can end the loop: only ``Shutdown`` or a bug in
the loop itself does, and then every request in flight fails.

The heartbeat lets ``/health`` tell a stuck engine (a step that never returns,
a GPU hang) from a slow one: ``stalled_for()`` is how long the loop has been
busy without completing a step; it is 0 while the loop idles. It is one float
written by the engine thread and read by others, so it costs nothing per step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pagedllm.engine.messages import (
    AbortRequest,
    AddRequest,
    AddResult,
    EngineCommand,
    EngineMessage,
    RequestOutputs,
    RequestRecord,
    RequestRecords,
    RequestsEnded,
    Shutdown,
    StatsSnapshot,
)
from pagedllm.executor.errors import ExecutorDeadError
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# While idle the loop wakes this often to refresh its stats snapshot and heartbeat.
IDLE_TICK_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine can no longer serve requests (its state could not be recovered after an error)."""


class EngineStepError(RuntimeError):
    """``LLMEngine.step()`` raised while this request was in flight; the request was aborted."""


class EngineLoop:
    """Owns ``engine`` on a thread of its own; ``emit`` is called on that thread with every message.

    ``start=False``: no thread; the caller runs the loop on its own thread with ``run()`` (the engine core
    process does, on its main thread: torch's CPU kernels called from a secondary thread used 1.3 of 2
    cores there, against 2.0 from the main thread, measured; docs/CPU.md)."""

    def __init__(self, engine: LLMEngine, emit: Callable[[EngineMessage], None], start: bool = True) -> None:
        self.engine = engine
        self._emit = emit
        self._cond = threading.Condition()
        self._commands: list[EngineCommand] = []  # guarded by _cond
        self._exited = False  # guarded by _cond: commands sent from now on are refused at once
        self.dead: BaseException | None = None
        # Written by the engine thread only; a float store is atomic, so readers need no lock.
        self.heartbeat = time.monotonic()  # end of the latest step or idle wait
        self._idle = True  # waiting for work: no progress is owed
        # Requests added and not ended -> generation tokens reported so far (engine thread only).
        self._live: dict[str, int] = {}
        # Beam searches added and not yet reported -> their prompt ids (engine thread only).
        self._beam_prompts: dict[str, list[int]] = {}
        self._done = threading.Event()  # set when the loop has exited
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until shutdown or death (``start=False`` only)."""
        if self._thread is not None:
            raise RuntimeError("this EngineLoop runs on its own thread")
        self._run()

    def send(self, command: EngineCommand) -> None:
        with self._cond:
            if not self._exited:
                self._commands.append(command)
                self._cond.notify()
                return
        self._apply(command)  # the loop is gone: the command is refused (adds fail fast)

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def stalled_for(self) -> float:
        """Seconds the loop has been busy since it last made progress; 0 while it idles."""
        if self._idle:
            return 0.0
        return max(time.monotonic() - self.heartbeat, 0.0)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._done.wait(timeout)

    # ---- the loop ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._done.set()

    def _loop(self) -> None:
        try:
            while self._run_once():
                pass
            error: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as e:  # a bug here must not leave requests hanging
            logger.exception("the engine loop crashed")
            error = EngineDeadError(f"the engine loop crashed: {e!r}")
        self._fail_all(error)
        self.dead = self.dead or error
        with self._cond:  # commands that raced the exit: refused now that the engine is dead
            commands, self._commands = self._commands, []
            self._exited = True
        for command in commands:
            self._apply(command)

    def _run_once(self) -> bool:
        """Wait for work, apply pending commands, step once. False once shut down."""
        has_work = self._engine_has_work()
        if self.dead is not None and self._live:  # marked dead: no step will ever finish these
            self._fail_all(EngineDeadError(f"the engine stopped: {self.dead!r}"))
        with self._cond:
            if not (self._commands or has_work):
                self._idle = True
                self.heartbeat = time.monotonic()
                # A timeout is an idle tick: no command, no step, only a stats refresh below.
                self._cond.wait(IDLE_TICK_S)
                self.heartbeat = time.monotonic()
            self._idle = False
            commands, self._commands = self._commands, []
        for i, command in enumerate(commands):
            if isinstance(command, Shutdown):
                with self._cond:  # what came after the shutdown is refused in _run
                    self._commands[:0] = commands[i + 1:]
                return False
            self._apply(command)
        if self._engine_has_work():
            self._step()
            self.heartbeat = time.monotonic()
        self._refresh_stats()
        return True

    def _engine_has_work(self) -> bool:
        try:
            return self.dead is None and self.engine.has_unfinished_requests()
        except Exception as e:  # a broken engine must not kill the loop silently
            self._mark_dead(e)
            return False

    # ---- commands --------------------------------------------------------------
    def _apply(self, command: EngineCommand) -> None:
        """The one dispatch of commands. Whatever one command raises fails its requests, not the loop."""
        try:
            match command:
                case AddRequest():
                    self._add(command)
                case AbortRequest():
                    self._abort(command.request_ids)
                case Shutdown():
                    pass  # _run_once stops the loop; once stopped there is nothing more to do
                case _:
                    raise TypeError(f"unknown engine command {type(command).__name__}")
        except Exception as e:
            logger.exception("engine command %s failed", type(command).__name__)
            self._fail_command(command, e)

    def _add(self, command: AddRequest) -> None:
        if self.dead is not None:
            self._emit(AddResult(command.request_id, EngineDeadError(f"the engine stopped: {self.dead!r}")))
            return
        try:
            if isinstance(command.params, BeamSearchParams):
                if command.lora_request is not None:
                    raise ValueError("beam search does not run with a LoRA adapter yet (use the base model)")
                self.engine.add_beam_search_request(command.request_id, command.prompt_token_ids, command.params)
                self._beam_prompts[command.request_id] = command.prompt_token_ids
            else:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                        priority=command.priority, lora_request=command.lora_request)
        except Exception as e:  # ValueError is a 400; anything else goes to the caller too
            self._emit(AddResult(command.request_id, e))
            return
        self._live[command.request_id] = 0
        self._emit(RequestRecords([RequestRecord(command.request_id, command.arrival_time,
                                                 num_prompt_tokens=len(command.prompt_token_ids))]))
        self._emit(AddResult(command.request_id))

    def _abort(self, request_ids: list[str]) -> None:
        if not self._exited:
            try:
                self.engine.abort_request(request_ids)
            except Exception as e:  # the blocks may be lost: stop taking requests
                logger.exception("abort_request(%s) failed", request_ids)
                self._mark_dead(e)
        self._end(request_ids, None, "abort")

    def _fail_command(self, command: EngineCommand, error: Exception) -> None:
        try:
            if isinstance(command, AddRequest):
                self._fail_requests([command.request_id], error)
                self._emit(AddResult(command.request_id, error))
            elif isinstance(command, AbortRequest):
                self._fail_requests(command.request_ids, error)
        except Exception:
            logger.exception("could not report the failure of %s", type(command).__name__)

    # ---- steps -------------------------------------------------------------------
    def _step(self) -> None:
        try:
            outputs = self.engine.step() + self._finished_beam_searches()
        except ExecutorDeadError as e:  # a worker is gone: no step can run again
            self._fail_all(EngineDeadError(f"the engine stopped: {e}"))
            self._mark_dead(e)
            return
        except Exception as e:  # report to the requests, keep serving
            logger.exception("engine step failed; aborting the %d requests in flight", len(self._live))
            self._fail_all(EngineStepError(f"the engine failed while running this request: {e!r}"))
            return
        now = time.monotonic()
        snapshots: list[RequestOutput] = []
        records: list[RequestRecord] = []
        for output in outputs:
            rid = output.request_id
            num_reported = self._live.get(rid)
            if num_reported is None:  # not one of ours (aborted)
                continue
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            num_new = max(num_tokens - num_reported, 0)
            if output.finished:
                del self._live[rid]
                reason = output.outputs[0].finish_reason if output.outputs else None
                records.append(RequestRecord(rid, now, num_new, finished=True, finish_reason=reason))
            elif num_new:
                self._live[rid] = num_tokens
                records.append(RequestRecord(rid, now, num_new))
            snapshots.append(_snapshot(output))
        if snapshots:
            self._emit(RequestOutputs(snapshots))
        if records:
            self._emit(RequestRecords(records))

    def _finished_beam_searches(self) -> list[RequestOutput]:
        """Beam searches that ended this step, taken from the engine as one finished output each."""
        if not self._beam_prompts:
            return []
        groups = self.engine.beam_search.groups
        done = [rid for rid in self._beam_prompts if rid in groups and groups[rid].output is not None]
        return [self.engine.beam_search.pop_output(rid).to_request_output(rid, self._beam_prompts.pop(rid))
                for rid in done]

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request in flight with ``error`` and abort them in the engine."""
        self._fail_requests(list(self._live), error)

    def _fail_requests(self, request_ids: Iterable[str], error: BaseException) -> None:
        ids = [rid for rid in request_ids if rid in self._live]
        if not ids:
            return
        self._end(ids, error, "error")  # first: these requests see their own error even if the abort fails
        try:
            if self.dead is None:
                self.engine.abort_request(ids)
        except Exception as e:  # cannot free the blocks: stop taking requests
            logger.exception("could not abort requests after an engine error")
            self._mark_dead(e)

    def _end(self, request_ids: Iterable[str], error: BaseException | None, reason: str) -> None:
        """Tell the front end that these requests (those still live) ended with ``reason``."""
        ended = [rid for rid in request_ids if self._live.pop(rid, None) is not None]
        for rid in ended:
            self._beam_prompts.pop(rid, None)
        if not ended:
            return
        now = time.monotonic()
        self._emit(RequestRecords([RequestRecord(rid, now, finished=True, finish_reason=reason) for rid in ended]))
        self._emit(RequestsEnded(ended, error))

    def _mark_dead(self, error: BaseException) -> None:
        if self.dead is None:
            logger.error("the engine is dead: %r", error)
            self.dead = error
        # No step will run again: the requests in flight would otherwise wait forever.
        self._end(list(self._live), EngineDeadError(f"the engine stopped: {error!r}"), "error")

    def _refresh_stats(self) -> None:
        if self.dead is not None:
            return
        try:
            stats = self.engine.get_stats()
        except Exception:
            logger.exception("get_stats failed")
            return
        self._emit(StatsSnapshot(stats))


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy the front end can read while the engine keeps appending to its own lists."""
    outputs = [
        dataclasses.replace(c, token_ids=list(c.token_ids),
                            logprobs=None if c.logprobs is None else list(c.logprobs))
        for c in output.outputs
    ]
    return dataclasses.replace(output, outputs=outputs)

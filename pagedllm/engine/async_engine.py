"""AsyncEngine: the asyncio face of ``LLMEngine``, used by the server.

It owns the thread that steps the engine and the per-request queues that carry
outputs back to the event loop:

    event loop (server coroutines)             engine thread ("pagedllm-engine")
    ------------------------------             ---------------------------------
    add_request()  tokenize in a worker thread
                   _Command "add"  ─────────►  LLMEngine.add_request()   (ValueError goes back
                   await its Future ◄───────                               through the Future)
                                               while there is work:
                                                   apply pending commands (add / abort)
                                                   LLMEngine.step()  -> [RequestOutput]
    RequestStream queues ◄─────────────────────    one call_soon_threadsafe per step and loop
    consumer closes / is cancelled
                   _Command "abort" ────────►  LLMEngine.abort_request()  (blocks freed before the
                                                                           next step)

Why a dedicated thread rather than an asyncio task that runs ``step()`` in an
executor: the LLMEngine is not thread-safe, and a thread that owns it outright
needs no lock around it (commands are applied between steps, in order); it also
steps back to back without waiting for the event loop to schedule the next
step, so a busy loop (many SSE writes) never slows generation. torch releases
the GIL inside its kernels, so the event loop keeps serving HTTP while a step
runs.

Outputs are cumulative (text and token ids so far), so a slow consumer only
needs the newest one: a stream skips outputs that were overtaken before it read
them. The engine thread hands the event loop a copy of each output, so the
engine may keep appending to its own lists.

The thread also records per-request timing (time to first token, inter-token
latencies, end-to-end latency) and tells the registered ``StatsListener`` s
(the server's Prometheus metrics), and keeps the latest ``EngineStats``
snapshot for scrapes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.config import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine can no longer serve requests (its state could not be recovered after an error)."""


class EngineStepError(RuntimeError):
    """``LLMEngine.step()`` raised while this request was in flight; the request was aborted."""


@dataclass
class RequestTiming:
    """Per-request timestamps (``time.monotonic``) and token counts, for latency metrics."""

    request_id: str
    arrival_time: float
    num_prompt_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0  # summed over the request's n sequences
    num_decode_steps: int = 0  # steps that produced tokens (sequences decode in lockstep)
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean decode time per token after the first (None with fewer than two token steps)."""
        if self.num_decode_steps < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_decode_steps - 1)


class StatsListener(Protocol):
    """Called on the engine thread; implementations must be thread-safe and quick."""

    def on_first_token(self, timing: RequestTiming) -> None: ...

    def on_inter_token(self, timing: RequestTiming) -> None:
        """New tokens after the first: ``timing.inter_token_latencies[-1]`` is the latest gap."""

    def on_request_finished(self, timing: RequestTiming) -> None: ...


class RequestStream:
    """Async iterator over one request's cumulative ``RequestOutput`` s; ``abort()`` to cancel it.

    Ends after the output with ``finished=True``; raises the engine's error if the
    request failed. A consumer that stops early must call ``abort()`` (``generate``
    does it in a ``finally``), which frees the request's blocks.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, prompt: str | None,
                 prompt_token_ids: list[int], timing: RequestTiming) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.loop = asyncio.get_running_loop()
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False
        # Engine-thread side: the latest output and the timing record.
        self.timing = timing
        self.last_output: RequestOutput | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty():  # outputs are cumulative: only the newest matters
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Abort the request unless it already finished; safe to call twice, from the event loop."""
        if not self._done:
            self._done = True
            self._engine._enqueue(lambda: self._engine._abort_now(self.request_id))

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)


class AsyncEngine:
    """Runs an ``LLMEngine`` on its own thread and streams outputs to asyncio consumers."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []  # guarded by _cond
        self._stopped = False
        self._dead: BaseException | None = None
        # Owned by the engine thread: request id -> stream of every request added and not finished.
        self._streams: dict[str, RequestStream] = {}
        self._listeners: list[StatsListener] = []
        self._stats: Any = None  # latest EngineStats snapshot (replaced whole, read from any thread)
        # One tokenizer thread: HF fast tokenizers are not safe to call from many threads at once.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer")
        self._thread = threading.Thread(target=self._run_loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        from pagedllm.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args))

    # ---- public API (event loop) ---------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; closing the generator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Tokenize (off the event loop), add the request to the engine and return its stream.

        Raises ``ValueError`` for input the engine rejects, before any output exists.
        """
        self.check_health()
        timing = RequestTiming(request_id, arrival_time=time.monotonic())
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            prompt_token_ids = await self.run_in_tokenizer_thread(self.engine.tokenize, prompt)
        else:
            prompt_text, prompt_token_ids = None, list(prompt)
        timing.num_prompt_tokens = len(prompt_token_ids)
        stream = RequestStream(self, request_id, prompt_text, prompt_token_ids, timing)
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._enqueue(lambda: self._add_now(stream, params, priority, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            stream.abort()  # the add may still happen; the abort command runs after it
            raise
        return stream

    async def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream ends with a ``finish_reason="abort"`` output."""
        self._enqueue(lambda: self._abort_now(request_id))

    async def run_in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (encode, chat templates, decode of long texts) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))

    def add_stats_listener(self, listener: StatsListener) -> None:
        self._listeners.append(listener)

    def get_stats(self) -> Any:
        """The ``EngineStats`` taken after the latest step (None before the first one)."""
        return self._stats

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or not self._thread.is_alive()

    def check_health(self) -> None:
        if self.is_dead:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)
        self._tokenizer_pool.shutdown(wait=False)

    # ---- engine thread -------------------------------------------------------
    def _enqueue(self, command: Callable[[], None]) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _run_loop(self) -> None:
        try:
            while self._run_once():
                pass
            error: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as e:  # a bug here must not leave requests hanging
            logger.exception("the engine loop crashed")
            error = EngineDeadError(f"the engine loop crashed: {e!r}")
        self._fail_all(error)
        self._dead = self._dead or error
        with self._cond:  # commands that raced the exit: adds fail fast now that the engine is dead
            commands, self._commands = self._commands, []
        for command in commands:
            command()

    def _run_once(self) -> bool:
        """Wait for work, apply pending commands, step once. False once shut down."""
        has_work = self._engine_has_work()
        with self._cond:
            while not (self._commands or has_work or self._stopped):
                self._cond.wait()
            if self._stopped:
                return False
            commands, self._commands = self._commands, []
        for command in commands:
            command()
        if self._engine_has_work():
            self._step()
        self._refresh_stats()
        return True

    def _engine_has_work(self) -> bool:
        try:
            return self._dead is None and self.engine.has_unfinished_requests()
        except Exception as e:  # a broken engine must not kill the loop silently
            self._mark_dead(e)
            return False

    def _add_now(self, stream: RequestStream, params: SamplingParams, priority: int,
                 accepted: concurrent.futures.Future[None]) -> None:
        if self._dead is not None:
            accepted.set_exception(EngineDeadError(f"the engine stopped: {self._dead!r}"))
            return
        try:
            self.engine.add_request(stream.request_id, stream.prompt_token_ids, params, priority=priority)
        except Exception as e:  # ValueError is a 400; anything else goes to the caller too
            accepted.set_exception(e)
            return
        self._streams[stream.request_id] = stream
        accepted.set_result(None)

    def _abort_now(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception as e:
            logger.exception("abort_request(%s) failed", request_id)
            self._mark_dead(e)
        if stream is not None:
            self._finish(stream, _aborted_output(stream), time.monotonic(), "abort")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # report to the requests, keep serving
            logger.exception("engine step failed; aborting the %d requests in flight", len(self._streams))
            self._fail_all(EngineStepError(f"the engine failed while running this request: {e!r}"))
            return
        now = time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted while the step ran
                continue
            output = _snapshot(output, stream.prompt)
            self._record_tokens(stream, output, now)
            if output.finished:
                del self._streams[stream.request_id]
                self._record_finished(stream, now, output.outputs[0].finish_reason if output.outputs else None)
            deliveries.setdefault(stream.loop, []).append((stream, output))
        for loop, items in deliveries.items():
            _deliver(loop, items)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every request in flight with ``error`` and abort them in the engine."""
        streams, self._streams = list(self._streams.values()), {}
        if not streams:
            return
        try:
            if self._dead is None:
                self.engine.abort_request([s.request_id for s in streams])
        except Exception as e:  # cannot free the blocks: stop taking requests
            logger.exception("could not abort requests after an engine error")
            self._mark_dead(e)
        now = time.monotonic()
        for stream in streams:
            self._finish(stream, error, now, "error")

    def _finish(self, stream: RequestStream, item: RequestOutput | BaseException, now: float,
                reason: str) -> None:
        self._record_finished(stream, now, reason)
        _deliver(stream.loop, [(stream, item)])

    def _mark_dead(self, error: BaseException) -> None:
        if self._dead is None:
            logger.error("the engine is dead: %r", error)
            self._dead = error

    def _record_tokens(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        timing = stream.timing
        stream.last_output = output
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        if num_tokens <= timing.num_generation_tokens:
            return
        timing.num_generation_tokens = num_tokens
        timing.num_decode_steps += 1
        if timing.first_token_time is None:
            timing.first_token_time = now
            self._notify("on_first_token", timing)
        else:
            timing.inter_token_latencies.append(now - timing.last_token_time)
            self._notify("on_inter_token", timing)
        timing.last_token_time = now

    def _record_finished(self, stream: RequestStream, now: float, reason: str | None) -> None:
        stream.timing.finished_time = now
        stream.timing.finish_reason = reason
        self._notify("on_request_finished", stream.timing)

    def _notify(self, method: str, timing: RequestTiming) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, method)(timing)
            except Exception:  # metrics must never break generation
                logger.exception("stats listener %s.%s failed", type(listener).__name__, method)

    def _refresh_stats(self) -> None:
        if self._dead is not None:
            return
        try:
            self._stats = self.engine.get_stats()
        except Exception:
            logger.exception("get_stats failed")


def _snapshot(output: RequestOutput, prompt: str | None) -> RequestOutput:
    """A copy the event loop can read while the engine keeps appending to its own lists."""
    outputs = [
        dataclasses.replace(c, token_ids=list(c.token_ids),
                            logprobs=None if c.logprobs is None else list(c.logprobs))
        for c in output.outputs
    ]
    return dataclasses.replace(output, outputs=outputs, prompt=output.prompt if output.prompt is not None else prompt)


def _aborted_output(stream: RequestStream) -> RequestOutput:
    last = stream.last_output
    if last is None:
        return RequestOutput(stream.request_id, stream.prompt, stream.prompt_token_ids, [], finished=True)
    outputs = [c if c.finish_reason else dataclasses.replace(c, finish_reason="abort") for c in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)


def _deliver(loop: asyncio.AbstractEventLoop,
             items: Iterable[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Hand a batch of items to ``loop`` in one thread-safe call."""
    items = list(items)

    def put_all() -> None:
        for stream, item in items:
            stream._put(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass

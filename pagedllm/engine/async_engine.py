"""AsyncEngine: the asyncio front end of an ``LLMEngine``, used by the server.

The engine itself runs in an ``EngineLoop``: on a thread of this process
(``AsyncEngine(engine)``, ``--engine-in-process``), or in the engine core process
behind an ``EngineCoreClient`` (``AsyncEngine.from_engine_core``, what
``pagedllm serve`` does), which offers the same ``send`` / ``dead`` /
``stalled_for`` interface. The front end and the loop exchange only the plain
messages of ``engine.messages``; the front end keeps every reply channel on its
side, keyed by request id:

    event loop (server coroutines)                 engine loop ("pagedllm-engine")
    ------------------------------                 -------------------------------
    add_request()  tokenize in a worker thread
                   register stream + pending add
                   AddRequest ───────────────────►  LLMEngine.add_request()
                   await the pending add ◄──────── AddResult (ValueError -> the caller)
                                                    while there is work:
                                                        apply commands, LLMEngine.step()
    RequestStream queues ◄──────────────────────── RequestOutputs (one call_soon_threadsafe
                                                                    per step and event loop)
    record listeners ◄──────────────────────────── RequestRecords (add, tokens, finish)
    get_stats() ◄─────────────────────────────── StatsSnapshot
    consumer closes / is cancelled
                   AbortRequest ─────────────────►  LLMEngine.abort_request()
    stream ends with an abort output ◄──────────── RequestsEnded

A client cancelled while its add is still queued cannot hurt the loop: the
pending add is an asyncio future resolved on its own event loop, only if nobody
cancelled it, and the abort sent on cancellation follows the add.

Outputs are cumulative (text and token ids so far), so a slow consumer only
needs the newest one: a stream skips outputs that were overtaken before it read
them. Per-request latency metrics are built from the ``RequestRecord`` s by the
server (``server/request_stats.py``), which registers with
``add_record_listener``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pagedllm.engine.engine_loop import EngineDeadError, EngineLoop, EngineStepError
from pagedllm.engine.messages import (
    AbortRequest,
    AddRequest,
    AddResult,
    EngineMessage,
    RequestOutputs,
    RequestRecord,
    RequestRecords,
    RequestsEnded,
    Shutdown,
    StatsSnapshot,
)
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedllm.config import EngineArgs
    from pagedllm.engine.core_client import EngineCoreProcess
    from pagedllm.engine.core_proc import CoreAddresses
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.lora.request import LoRARequest

__all__ = ["AsyncEngine", "EngineDeadError", "EngineDrainingError", "EngineOverloadedError", "EngineStepError",
           "RecordListener", "RequestStream"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

class EngineDrainingError(EngineDeadError):
    """The server is shutting down: requests in flight finish, new ones are refused (a 503 like a dead engine)."""


# Called with each batch of records, on the thread that receives the engine's messages; must be quick.
RecordListener = Callable[[list[RequestRecord]], None]
# Builds the engine handle (an EngineLoop or an EngineCoreClient) around the front end's message callback.
CoreFactory = Callable[[Callable[[EngineMessage], None]], Any]


class EngineOverloadedError(RuntimeError):
    """The admission bound (``max_waiting_requests``) is reached; the server answers 429."""


class RequestStream:
    """Async iterator over one request's cumulative ``RequestOutput`` s; ``abort()`` to cancel it.

    Ends after the output with ``finished=True``; raises the engine's error if the
    request failed. A consumer that stops early must call ``abort()`` (``generate``
    does it in a ``finally``), which frees the request's blocks.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, prompt: str | None,
                 prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.loop = asyncio.get_running_loop()
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False
        self.last_output: RequestOutput | None = None  # set where the engine's messages arrive

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
            self._engine._loop.send(AbortRequest([self.request_id]))

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)


class AsyncEngine:
    """Runs an ``LLMEngine`` in an ``EngineLoop`` and streams its outputs to asyncio consumers."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 core: CoreFactory | None = None) -> None:
        """``engine`` gives the tokenizer and model config; it runs here unless ``core`` builds another handle."""
        self.engine = engine
        # Admission bound on requests added and not yet ended (queued or running); None: unbounded.
        self.max_waiting_requests = max_waiting_requests
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        # Reply channels, keyed by request id; written from event loops, read where messages arrive.
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}  # added (or being added) and not ended
        self._pending_adds: dict[str, asyncio.Future[None]] = {}
        self._record_listeners: list[RecordListener] = []
        self._stats: Any = None  # latest EngineStats snapshot (replaced whole, read from any thread)
        self._accepting = True  # False once draining for shutdown
        # One tokenizer thread: HF fast tokenizers are not safe to call from many threads at once.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer")
        self._loop = core(self._on_message) if core is not None else EngineLoop(engine, self._on_message)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_waiting_requests: int | None = None) -> AsyncEngine:
        """The engine in this process, on its own thread."""
        from pagedllm.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args), max_waiting_requests)

    @classmethod
    def from_engine_core(cls, args: EngineArgs, addresses: CoreAddresses, index: int, engine_pid: int,
                         process: EngineCoreProcess | None = None,
                         max_waiting_requests: int | None = None) -> AsyncEngine:
        """Front end ``index`` of the engine core process at ``addresses``; with ``process``, it owns the engine."""
        from pagedllm.engine.core_client import EngineCoreClient, FrontEndModel

        model = FrontEndModel(args)  # the tokenizer loads while the engine process starts

        def connect(emit: Callable[[EngineMessage], None]) -> EngineCoreClient:
            client = EngineCoreClient(addresses, index, emit, engine_pid, process)
            model.take_engine_facts(client.model_facts)  # type: ignore[arg-type] - set once ready
            return client

        return cls(model, max_waiting_requests, core=connect)  # type: ignore[arg-type]

    # ---- public API (event loop) ---------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its cumulative outputs; closing the generator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority, lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | BeamSearchParams,
                          priority: int = 0, lora_request: LoRARequest | None = None) -> RequestStream:
        """Tokenize (off the event loop), add the request to the engine and return its stream.

        Raises ``ValueError`` for input the engine rejects, before any output exists. With
        ``BeamSearchParams`` the engine runs a beam search and the stream gets one final output.
        """
        self.check_health()
        self._check_admission()  # before tokenizing too: a flood must not queue up on the tokenizer thread
        arrival_time = time.monotonic()
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            prompt_token_ids = await self.run_in_tokenizer_thread(self.engine.tokenize, prompt)
        else:
            prompt_text, prompt_token_ids = None, list(prompt)
        stream = RequestStream(self, request_id, prompt_text, prompt_token_ids)
        accepted: asyncio.Future[None] = stream.loop.create_future()
        with self._lock:
            # Checked here, after tokenizing: a request counts as in flight (drained) once registered below,
            # and one still tokenizing when the drain began is refused rather than run during shutdown.
            if not self._accepting:
                raise EngineDrainingError("the server is shutting down and accepts no new requests")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._check_admission()
            self._streams[request_id] = stream
            self._pending_adds[request_id] = accepted
        self._loop.send(AddRequest(request_id, prompt_token_ids, params, priority, arrival_time, lora_request))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()  # the add may still happen; the abort command runs after it
            raise
        return stream

    @property
    def num_unfinished_requests(self) -> int:
        """Requests added (or being added) and not ended; O(1), no round trip to the engine thread."""
        return len(self._streams)

    def _check_admission(self) -> None:
        limit = self.max_waiting_requests
        if limit is not None and len(self._streams) >= limit:
            raise EngineOverloadedError(f"The server is at its limit of {limit} unfinished requests "
                                        "(--max-waiting-requests); retry after a short wait.")

    async def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream ends with a ``finish_reason="abort"`` output."""
        self._loop.send(AbortRequest([request_id]))

    async def run_in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (encode, chat templates, decode of long texts) off the event loop."""
        self.check_health()  # after shutdown the pool is gone: a 503, not "cannot schedule new futures"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))

    def add_record_listener(self, listener: RecordListener) -> None:
        """Receive every batch of ``RequestRecord`` s (adds, tokens, finishes), for latency metrics."""
        self._record_listeners.append(listener)

    def get_stats(self) -> Any:
        """The ``EngineStats`` taken after the latest step (None before the first one)."""
        return self._stats

    @property
    def is_dead(self) -> bool:
        return self._loop.dead is not None or not self._loop.is_alive()

    def check_health(self) -> None:
        if self.is_dead:
            raise EngineDeadError(f"the engine stopped: {self._loop.dead!r}")

    def stalled_for(self) -> float:
        """Seconds the engine loop has had work without completing a step (0 while idle)."""
        return self._loop.stalled_for()

    @property
    def num_in_flight(self) -> int:
        """Requests added (or being added) and not yet ended, as the front end sees them."""
        return len(self._streams)

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineDrainingError) from now on; those in flight carry on."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    def abort_all(self) -> int:
        """Abort every request in flight (each stream ends with an abort output); returns how many."""
        with self._lock:
            ids = list(self._streams)
        if ids:
            self._loop.send(AbortRequest(ids))
        return len(ids)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._loop.send(Shutdown())
        self._loop.join(timeout)
        self._tokenizer_pool.shutdown(wait=False)

    # ---- messages from the engine (the engine loop's thread) -------------------------------
    def _on_message(self, message: EngineMessage) -> None:
        match message:
            case RequestOutputs():
                self._on_outputs(message.outputs)
            case RequestRecords():
                self._notify(message.records)
            case AddResult():
                self._on_add_result(message)
            case RequestsEnded():
                self._on_ended(message)
            case StatsSnapshot():
                self._stats = message.stats
            case _:
                logger.error("unknown engine message %s", type(message).__name__)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                if output.prompt is None:  # the engine got token ids; the client may have sent text
                    output.prompt = stream.prompt
                stream.last_output = output
                deliveries.setdefault(stream.loop, []).append((stream, output))
        for loop, items in deliveries.items():
            _deliver(loop, items)

    def _on_add_result(self, result: AddResult) -> None:
        with self._lock:
            accepted = self._pending_adds.pop(result.request_id, None)
            stream = self._streams.pop(result.request_id, None) if result.error is not None else None
        if accepted is not None:
            _call_soon(accepted.get_loop(), _resolve, accepted, result.error)
        elif stream is not None:  # failed after it was accepted: the stream gets the error
            _deliver(stream.loop, [(stream, result.error)])

    def _on_ended(self, ended: RequestsEnded) -> None:
        with self._lock:
            streams = [s for s in (self._streams.pop(rid, None) for rid in ended.request_ids) if s is not None]
        for stream in streams:
            item = ended.error if ended.error is not None else _aborted_output(stream)
            _deliver(stream.loop, [(stream, item)])

    def _notify(self, records: list[RequestRecord]) -> None:
        for listener in self._record_listeners:
            try:
                listener(records)
            except Exception:  # metrics must never break generation
                logger.exception("record listener %r failed", listener)


def _resolve(accepted: asyncio.Future[None], error: BaseException | None) -> None:
    """On the add's event loop: answer it unless its caller gave up (cancelled) meanwhile."""
    if accepted.done():
        return
    if error is None:
        accepted.set_result(None)
    else:
        accepted.set_exception(error)


def _aborted_output(stream: RequestStream) -> RequestOutput:
    last = stream.last_output
    if last is None:
        return RequestOutput(stream.request_id, stream.prompt, stream.prompt_token_ids, [], finished=True)
    outputs = [c if c.finish_reason else dataclasses.replace(c, finish_reason="abort") for c in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Hand a batch of items to ``loop`` in one thread-safe call."""

    def put_all() -> None:
        for stream, item in items:
            stream._put(item)

    _call_soon(loop, put_all)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass

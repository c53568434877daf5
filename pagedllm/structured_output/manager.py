"""StructuredOutputManager: the engine side of constrained decoding.

It owns the grammar cache and thread pool, the sequences held until their grammar is
compiled, one GrammarMatcher per running sequence, and the host bitmask buffer.
The engine calls it at four points (engine/llm_engine.py, marked "structured outputs"):

    add_request ─► add_request (parse: ValueError; compile submitted) ─► hold (each sequence)
    step        ─► release (sequences whose grammar is ready go to the scheduler)
                ─► grammar_bitmask (after schedule) ─► accept (after update_from_output)
    finish      ─► free (sequence ids)

A preempted sequence keeps its generated tokens (recompute replays them as prompt) and
so keeps its matcher; nothing is rolled back.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.outputs import GrammarBitmask, RequestUpdate
from pagedllm.core.request import Request
from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (apps send the same schema again and again).
_CACHE_SIZE = 256
_POOL_THREADS = 2


@dataclass
class _Held:
    """A request's sequences waiting for its grammar: (sequence, the sequence it forks from)."""

    future: Future
    sequences: list[tuple[Request, str | None]] = field(default_factory=list)


class StructuredOutputManager:
    """Compiles grammars off the engine loop and tracks each constrained sequence's grammar state."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int], max_num_seqs: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = set(stop_token_ids)
        self._max_rows = max_num_seqs
        self._backend: Any = None  # XgrammarBackend, built with the first grammar
        self._pool: ThreadPoolExecutor | None = None
        self._grammars: OrderedDict[tuple[str, str], Future] = OrderedDict()  # spec key -> compiled grammar
        self._held: dict[str, _Held] = {}  # request id -> its sequences
        self._matchers: dict[str, Any] = {}  # sequence id -> GrammarMatcher
        self._bitmask: Any = None  # (max_rows, ceil(V / 32)) int32 host tensor, reused every step

    # ---- admission -------------------------------------------------------------
    def add_request(self, request_id: str, params: StructuredOutputsParams) -> None:
        """Start compiling ``params``' grammar (a cache hit reuses it); ValueError if it cannot be parsed."""
        if self._tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer; the engine runs without one (skip_tokenizer_init)")
        key = params.key()
        future = self._grammars.get(key)
        if future is None:
            grammar = self._get_backend().parse(params)  # fast; the ValueError a user sees
            future = self._pool.submit(self._backend.compile, grammar)
            self._grammars[key] = future
            if len(self._grammars) > _CACHE_SIZE:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(key)
        self._held[request_id] = _Held(future)

    def is_held(self, request_id: str) -> bool:
        return request_id in self._held

    def hold(self, request_id: str, sequence: Request, fork_from: str | None) -> None:
        """Keep ``sequence`` (of a request passed to add_request) out of the scheduler until its grammar is ready."""
        self._held[request_id].sequences.append((sequence, fork_from))

    def release(self) -> tuple[list[tuple[Request, str | None]], list[str]]:
        """(sequences whose grammar is now compiled, each with its matcher; ids of sequences whose compile failed)."""
        ready: list[tuple[Request, str | None]] = []
        failed: list[str] = []
        for request_id, held in list(self._held.items()):
            if not held.future.done():
                continue
            del self._held[request_id]
            error = held.future.exception()
            if error is not None:
                logger.error("grammar of request %s failed to compile: %s", request_id, error)
                self._grammars = OrderedDict((k, f) for k, f in self._grammars.items() if f is not held.future)
                failed.extend(seq.request_id for seq, _ in held.sequences)
                continue
            for seq, fork_from in held.sequences:
                self._matchers[seq.request_id] = self._backend.matcher(held.future.result())
                ready.append((seq, fork_from))
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` s for a held request's grammar (an engine with nothing else to do)."""
        futures = [h.future for h in self._held.values()]
        if futures:
            wait_futures(futures, timeout, return_when="FIRST_COMPLETED")

    # ---- each step -------------------------------------------------------------
    def grammar_bitmask(self, num_scheduled_tokens: dict[str, int],
                        requests: dict[str, Request]) -> GrammarBitmask | None:
        """The allowed next tokens of each constrained sequence that samples this step (None: no such sequence)."""
        if not self._matchers:
            return None
        req_ids: list[str] = []
        for req_id, num_tokens in num_scheduled_tokens.items():
            matcher = self._matchers.get(req_id)
            if matcher is None:
                continue
            req = requests[req_id]
            if req.num_computed_tokens + num_tokens < req.num_tokens:
                continue  # a prompt chunk before the last: nothing is sampled
            if len(req_ids) == self._bitmask.shape[0]:
                self._bitmask = self._backend.allocate_bitmask(2 * len(req_ids))
            matcher.fill_next_token_bitmask(self._bitmask, len(req_ids))
            req_ids.append(req_id)
        if not req_ids:
            return None
        # A view of the reused buffer: the runner reads it within this step (a process boundary would copy it).
        return GrammarBitmask(req_ids, self._bitmask[:len(req_ids)].numpy())

    def accept(self, updates: list[RequestUpdate]) -> None:
        """Advance each constrained sequence's matcher over the tokens it sampled this step."""
        if not self._matchers:
            return
        for update in updates:
            matcher = self._matchers.get(update.req_id)
            if matcher is None:
                continue
            for token in update.new_token_ids:
                if not matcher.accept_token(token):
                    # Only possible when every token was masked (e.g. min_tokens hid the EOS a finished
                    # grammar needs); the matcher stays where it was, the sequence keeps its masks.
                    logger.warning("sequence %s sampled token %d outside its grammar", update.req_id, token)
                    break

    def free(self, seq_ids: list[str] | set[str]) -> None:
        """Forget finished or aborted sequences (their request id too, if still held)."""
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)
            self._held.pop(seq_id, None)

    def abort(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        """Sequences with a matcher plus requests held for their grammar (0 when all are done)."""
        return len(self._matchers) + len(self._held)

    def _get_backend(self) -> Any:
        if self._backend is None:
            from pagedllm.structured_output.backend import XgrammarBackend

            self._backend = XgrammarBackend(self._tokenizer, self._vocab_size, self._stop_token_ids)
            self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="pagedllm-grammar")
            self._bitmask = self._backend.allocate_bitmask(self._max_rows)
        return self._backend

"""LLMEngine: the synchronous engine. add_request / step / abort.

    add_request ─► tokenize, validate, fan out n samples ─► Scheduler.add_request
    step        ─► Scheduler.schedule ─► Executor.execute_model ─► Scheduler.update_from_output
                ─► OutputProcessor.process (detokenize, stop strings) ─► RequestOutput (cumulative)
                ─► Scheduler.finish_requests / free_finished for what the processor ended

Async scheduling (on by default with CUDA): each step schedules and launches step N+1
(``execute_model_async``) before it finishes step N (its tokens, detokenization, stops), so
the GPU runs N+1 while the host works on N. A request that ends at N wastes N+1's slot.

Text lives here (tokenizer, OutputProcessor); the scheduler below sees only token
ids. The engine talks to the scheduler only through its public methods, and
beam search talks to the scheduler through the narrow ``BeamScheduler`` seam.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pagedllm.config import EngineArgs, ModelConfig
from pagedllm.core.outputs import ModelRunnerOutput, RequestUpdate, SchedulerOutput, SpecDecodingStats
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.beam_search import BeamSearchManager
from pagedllm.engine.output_processor import OutputProcessor, RequestState
from pagedllm.engine.stat_logger import StatLogger, log_request
from pagedllm.logging_utils import log_phase
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.structured_output import StructuredOutputManager

if TYPE_CHECKING:
    from pagedllm.lora.request import LoRARequest
    from pagedllm.worker.async_output import StepHandle

logger = logging.getLogger(__name__)

# Longest wait for a grammar to compile when the engine has nothing else to run (structured outputs).
_GRAMMAR_WAIT_S = 0.01


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks held by requests
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # cumulative tokens
    prefix_cache_hits: int
    num_prompt_tokens: int  # cumulative
    num_generation_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    spec_decoding: SpecDecodingStats | None = None  # cumulative; None with speculation off
    running_lora_adapters: list[str] = field(default_factory=list)  # --- lora: adapter names
    waiting_lora_adapters: list[str] = field(default_factory=list)
    max_lora: int = 0  # device slots (0: LoRA off)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        from pagedllm.loader import load_tokenizer, resolve_model
        from pagedllm.models.registry import check_parallel_shapes

        self.args = args
        self.model_config: ModelConfig = args.model_config()
        # One log line per start-up phase with its time (logging_utils.log_phase).
        with log_phase(logger, "config") as phase:
            resolve_model(self.model_config)
            mc = self.model_config
            phase.detail = (f"{mc.model} ({mc.load_format}, {mc.hf_config.architectures[0]}), "
                            f"max_model_len {mc.max_model_len}")
            pc = args.parallel_config()
            check_parallel_shapes(mc.hf_config, pc.tensor_parallel_size, pc.pipeline_parallel_size)
        if not args.skip_tokenizer_init:
            with log_phase(logger, "tokenizer"):
                self.tokenizer = load_tokenizer(self.model_config)
        else:
            self.tokenizer = None
        self.cache_config = args.cache_config()
        self.scheduler_config = args.scheduler_config(self.model_config.max_model_len)
        num_blocks, num_cpu_blocks = self._start_workers(args)
        # Request lines and periodic stats (engine/stat_logger.py); `pagedllm serve` turns them on.
        self.stat_logger = None if args.disable_log_stats else StatLogger()
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config, num_blocks, num_cpu_blocks)
        self.async_scheduling = self.scheduler_config.async_scheduling
        # Async scheduling: launched steps not yet finished, oldest first: at most one, or one per pipeline stage
        # (pipeline parallel: the stages work on different batches at once).
        self._in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self._max_in_flight = self.scheduler_config.max_concurrent_batches
        if self.async_scheduling:
            logger.info("async scheduling: on (the next step is scheduled while the GPU runs this one)")
        config_eos = _as_id_set(getattr(self.model_config.hf_config, "eos_token_id", None))
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else min(config_eos, default=None)
        self.extra_eos_ids = (config_eos | _generation_config_eos_ids(self.model_config.model)) - {self.eos_token_id}
        self.vocab_size = self.model_config.hf_config.vocab_size
        # Every id that ends a sequence unless ignore_eos.
        self.all_eos_ids = self.extra_eos_ids | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self.output_processor = OutputProcessor(self.tokenizer)
        self._lora_paths: dict[int, str] = {}  # --- lora: adapters checked by check_lora, id -> path
        self.beam_search = BeamSearchManager(self.scheduler, self.all_eos_ids, self._decode_beam)
        # --- structured outputs: grammars, matchers and the step's bitmask (xgrammar loads on first use) ---
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size, self.all_eos_ids,
                                                         self.scheduler_config.max_num_seqs)
        self.spec_logger = None
        if self.scheduler.spec_stats is not None:
            from pagedllm.spec_decode.metrics import SpecDecodingLogger

            self.spec_logger = SpecDecodingLogger()

    def _start_workers(self, args: EngineArgs) -> tuple[int, int]:
        """The executor and its workers (the model loads as they start), the KV cache sized from their
        memory profiles; returns (device blocks, CPU swap blocks)."""
        from pagedllm.executor.selection import make_executor

        with log_phase(logger, "weights") as phase:
            self.executor = make_executor(args.distributed_executor_backend, self.model_config, self.cache_config,
                                          self.scheduler_config, args.device_config(), args.parallel_config())
            phase.detail = f"{self.model_config.torch_dtype}".removeprefix("torch.")
        with log_phase(logger, "memory profile"):
            num_blocks = self.executor.determine_num_blocks()
        num_cpu_blocks = 0
        if self.scheduler_config.preemption_mode == "swap":
            num_cpu_blocks = int(self.cache_config.swap_space * (1 << 30) // self.executor.kv_cache_bytes_per_block())
        _check_kv_cache_fits(self.model_config.max_model_len, num_blocks, self.cache_config)
        with log_phase(logger, "KV cache") as phase:  # on a GPU this includes the CUDA graph capture
            phase.detail = f"{num_blocks} blocks"
            self.executor.initialize_cache(num_blocks, num_cpu_blocks)
        return num_blocks, num_cpu_blocks

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ---- requests ----------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_lora(lora_request)
        prompt_text, prompt_ids = self._prompt_ids(prompt)
        params.resolve_token_constraints(self.tokenizer, self.vocab_size)  # --- structured outputs
        if not self.args.disable_log_requests:
            log_request(request_id, prompt_text, prompt_ids, params, self.args.max_log_len)
        arrival_time = arrival_time if arrival_time is not None else time.time()
        samples = [(request_id if params.best_of == 1 else f"{i}_{request_id}", self._child_params(params, i))
                   for i in range(params.best_of)]
        added: list[str] = []
        try:
            if params.structured_outputs is not None:  # --- structured outputs: compile off the loop, hold
                self.structured_output.add_request(request_id, params.structured_outputs)
            for req_id, child_params in samples:
                req = Request(req_id, prompt_ids, child_params, self.eos_token_id, arrival_time, priority,
                              lora_request)
                # Samples after the first share its prompt KV (fork) instead of recomputing it.
                if self.structured_output.is_held(request_id):  # --- structured outputs
                    req.max_tokens = self.scheduler.check_length(req.num_prompt_tokens, req.max_tokens)
                    self.structured_output.hold(request_id, req, added[0] if added else None)
                else:
                    self.scheduler.add_request(req, fork_from=added[0] if added else None)
                added.append(req_id)
            self.output_processor.add_request(request_id, prompt_text, prompt_ids, params, arrival_time, samples)
        except Exception:  # all or nothing: no sequence stays in the scheduler
            self.structured_output.abort(request_id)  # --- structured outputs
            self.scheduler.finish_requests(added, RequestStatus.FINISHED_ABORTED)
            for rid in added:
                self.scheduler.free_finished(rid)
            raise

    def check_lora(self, lora_request: LoRARequest | None) -> None:
        """ValueError unless ``lora_request`` names an adapter this engine can run (its config and the
        shapes in its file header checked against the model, once per adapter id; the worker loads the
        weights when it first runs it)."""
        if lora_request is None:
            return
        from pagedllm.lora.request import LoRARequest

        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        lora_config = self.scheduler_config.lora_config
        if lora_config is None:
            raise ValueError("lora_request: LoRA is not enabled (LLM(enable_lora=True) / --enable-lora)")
        known = self._lora_paths.get(lora_request.lora_int_id)
        if known == lora_request.lora_path:
            return
        if known is not None:
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} already names the adapter at {known!r}")
        from pagedllm.lora.adapter import adapter_shapes, check_adapter
        from pagedllm.lora.layers import target_shapes

        hf_config = self.model_config.hf_config
        shapes = adapter_shapes(lora_request.lora_path, lora_config.max_lora_rank)
        check_adapter(shapes, target_shapes(hf_config), hf_config.num_hidden_layers, lora_request.lora_path)
        self._lora_paths[lora_request.lora_int_id] = lora_request.lora_path

    @property
    def requests(self) -> dict[str, RequestState]:
        """Requests added and not yet finished or aborted (beam searches apart), by request id."""
        return self.output_processor.requests

    def add_beam_search_request(self, request_id: str, prompt: str | list[int], params: BeamSearchParams) -> None:
        """Queue a beam search; its result appears in `self.beam_search` when done."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        _, prompt_ids = self._prompt_ids(prompt)
        self.scheduler.check_length(len(prompt_ids), params.max_tokens)
        self.beam_search.add(request_id, prompt_ids, params)

    def tokenize(self, text: str) -> list[int]:
        """Prompt text to token ids, the one way every entry point does it (special tokens as the model adds them)."""
        if self.tokenizer is None:
            raise ValueError("prompt must be token ids: the engine runs without a tokenizer (skip_tokenizer_init)")
        return self.tokenizer.encode(text)

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
            if not ids:
                raise ValueError("prompt must not be empty")
            return prompt, ids
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token id {t!r} is not an integer in [0, {self.vocab_size})")
        return None, list(prompt)

    def _child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        child = params.clone()
        child.n = child.best_of = 1
        if params.seed is not None:
            child.seed = params.seed + index
        if params.best_of > params.n and child.logprobs is None:
            child.logprobs = 0  # best_of ranks samples by cumulative logprob
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.all_eos_ids
        child.all_stop_token_ids = stop_ids
        return child

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            if self.beam_search.abort(rid):
                continue
            ids = self.output_processor.abort_request(rid)
            if ids is None:
                continue
            self.structured_output.abort(rid)  # --- structured outputs
            self.structured_output.free(ids)
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            for sid in ids:
                self.scheduler.free_finished(sid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.beam_search.has_unfinished_groups() or bool(self._in_flight)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed = self._release_grammar_requests()  # --- structured outputs
        if not self.async_scheduling:
            return self._step_sync(failed)
        if self.scheduler.needs_sync_step or self.beam_search.groups:
            # Sampling that reads the host's tokens: finish the step in flight, then go step by step.
            return self._finish_in_flight(failed) if self._in_flight else self._step_sync(failed)
        sched_out = self.scheduler.schedule()
        launched = not sched_out.is_empty
        if launched:
            self._in_flight.append((sched_out, self.executor.execute_model_async(sched_out)))
        # Finish the oldest step once the pipe is full, or when there was nothing new to launch.
        outputs = []
        if len(self._in_flight) > self._max_in_flight or not launched:
            outputs = self._finish_in_flight(failed)
        elif failed:
            outputs = self._finish_step(None, None, failed)
        if not launched and not outputs and not failed:
            self.structured_output.wait(_GRAMMAR_WAIT_S)  # --- structured outputs: no busy spin while compiling
        return outputs

    def _finish_in_flight(self, failed: list[RequestUpdate]) -> list[RequestOutput]:
        """Async scheduling: read the oldest launched step's tokens and process them (and ``failed``)."""
        if not self._in_flight:
            return self._finish_step(None, None, failed) if failed else []
        sched_out, handle = self._in_flight.popleft()
        return self._finish_step(sched_out, handle.get(), failed)

    def _step_sync(self, failed: list[RequestUpdate]) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty and not failed:
            self.structured_output.wait(_GRAMMAR_WAIT_S)  # --- structured outputs: no busy spin while compiling
            return []
        sched_out.grammar_bitmask = self.structured_output.grammar_bitmask(  # --- structured outputs
            sched_out.num_scheduled_tokens, self.scheduler.requests)
        return self._finish_step(sched_out, self.executor.execute_model(sched_out), failed)

    def _finish_step(self, sched_out: SchedulerOutput | None, runner_out: ModelRunnerOutput | None,
                     failed: list[RequestUpdate]) -> list[RequestOutput]:
        """A step's tokens into the scheduler, then outputs: detokenize, stop strings, beams, stats."""
        updates = self.scheduler.update_from_output(sched_out, runner_out) if sched_out is not None else []
        self.structured_output.accept(updates)  # --- structured outputs
        updates += failed
        if self.beam_search.groups:  # beams' updates go to the beam search, the rest to the user
            updates = [u for u in updates if not self.beam_search.on_update(u)]
        processed = self.output_processor.process(updates)
        if processed.stopped_req_ids:  # ended by a stop string, which only the detokenizer sees
            self.scheduler.finish_requests(processed.stopped_req_ids, RequestStatus.FINISHED_STOPPED)
        for req_id in processed.finished_req_ids:
            self.scheduler.free_finished(req_id)
        self.structured_output.free(processed.finished_req_ids)  # --- structured outputs
        self.beam_search.advance()
        if self.spec_logger is not None:
            self.spec_logger.maybe_log(self.scheduler.spec_stats)
        if self.stat_logger is not None:
            self.stat_logger.maybe_log(self.get_stats())
        return processed.request_outputs

    # --- structured outputs ---
    def _release_grammar_requests(self) -> list[RequestUpdate]:
        """Hand sequences whose grammar compiled to the scheduler; those whose grammar failed end as aborted."""
        ready, failed = self.structured_output.release()
        for req, fork_from in ready:
            self.scheduler.add_request(req, fork_from=fork_from)
        return [RequestUpdate(seq_id, [], finish_reason="abort") for seq_id in failed]
    # --- end structured outputs ---

    def _decode_beam(self, token_ids: list[int]) -> str | None:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else None

    # ---- stats -------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            num_preemptions=s.num_preemptions, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_prompt_tokens=self.output_processor.num_prompt_tokens,
            num_generation_tokens=self.output_processor.num_generation_tokens, num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks, spec_decoding=s.spec_decoding,
            running_lora_adapters=s.running_lora_adapters, waiting_lora_adapters=s.waiting_lora_adapters,
            max_lora=self.scheduler_config.lora_config.max_loras if self.scheduler_config.lora_config else 0)


def _check_kv_cache_fits(max_model_len: int, num_blocks: int, cache_config) -> None:  # noqa: ANN001
    """A profiled (not overridden) KV cache must hold one request of max_model_len tokens, as vLLM demands."""
    capacity = num_blocks * cache_config.block_size
    if cache_config.num_gpu_blocks is None and capacity < max_model_len:
        raise ValueError(
            f"max_model_len {max_model_len} is longer than the KV cache holds ({capacity} tokens in {num_blocks} "
            "blocks); lower --max-model-len, or raise --gpu-memory-utilization (GPU) or --cpu-kv-cache-gib (CPU)")


def _generation_config_eos_ids(model_path: str | None) -> set[int]:
    """Extra end-of-sequence ids from an HF directory's generation_config.json (Llama 3 lists several)."""
    if not model_path:
        return set()
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return set()
    return _as_id_set(json.loads(path.read_text()).get("eos_token_id"))


def _as_id_set(ids: int | list[int] | None) -> set[int]:
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}

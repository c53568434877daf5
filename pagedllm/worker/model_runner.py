"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

    SchedulerOutput ─► InputBatch.update_states (the diff, into persistent rows)
        ─► InputBatch.prepare (numpy indexing of those rows, host) ─► FlatBatch
        ─► InputBuffers (pinned host → persistent device tensors, non-blocking)
        ─► model forward (eager, or a CUDA graph replay for decode-only batches), queued
        ─► sampling metadata gathered from the rows' SamplingState while the GPU runs the forward
        ─► logits at each request's sampled positions (logits_indices) ─► Sampler
           (a step with drafts: RejectionSampler over each request's k + 1 positions)
        ─► sampled ids appended to the rows ─► ModelRunnerOutput
           (python lists: the only host sync is reading sampled ids)
        ─► speculative decoding: the Proposer drafts each request's next tokens

``execute_model_async`` (async scheduling) runs the same step but leaves the sampled ids on the
device: the next step's inputs take them from there, and the host reads them later through the
returned handle (worker/async_output.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention.backend import get_backend, kv_bytes
from pagedllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig
from pagedllm.core.outputs import LogprobsLists, ModelRunnerOutput, SchedulerOutput
from pagedllm.models.layers.parallel import ParallelState, recv_activations, send_activations
from pagedllm.models.layers.sampler import Sampler, SamplerOutput
from pagedllm.quantization.base import step_shape
from pagedllm.spec_decode import NgramProposer, Proposer
from pagedllm.spec_decode.draft_model import DraftModel
from pagedllm.spec_decode.rejection_sampler import RejectionSampler
from pagedllm.worker.async_output import DeferredStep, DoneStep, PendingTokens, StepHandle, reserve_slots
from pagedllm.worker.cuda_graphs import CudaGraphRunner
from pagedllm.worker.input_batch import FlatBatch, InputBatch, flat_logits_indices
from pagedllm.worker.input_buffers import InputBuffers
from pagedllm.worker.kv_swap import SwapSpace
from pagedllm.worker.sampling_metadata import SamplingMetadata

if TYPE_CHECKING:
    from pagedllm.lora.manager import LoRAManager

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 device_config: DeviceConfig, device: torch.device, parallel: ParallelState | None = None) -> None:
        from pagedllm.loader import load_model

        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.device = device
        # This rank's tensor-parallel share of the KV heads, and its pipeline stage's layers.
        self.parallel = parallel or ParallelState()
        self.block_size = cache_config.block_size
        self.attn_backend = get_backend(device_config.attention_backend)
        self.model = load_model(model_config, device, self.attn_backend)
        self.model.eval()
        self.dtype = model_config.torch_dtype
        self.vocab_size = model_config.hf_config.vocab_size
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        # Pipeline stages receive and send activations around the forward: eager only.
        self.use_cuda_graphs = (device.type == "cuda" and not device_config.enforce_eager
                                and self.parallel.pp_size == 1)
        self.graphs: CudaGraphRunner | None = None
        max_tokens = max(scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs)
        max_num_blocks = -(-model_config.max_model_len // self.block_size)
        self.input_batch = InputBatch(scheduler_config.max_num_seqs, model_config.max_model_len, max_num_blocks,
                                      self.vocab_size, device)
        lora_config = scheduler_config.lora_config
        lora_plan_blocks = 0  # --- lora: on a GPU the input buffers hold each step's SGMV plan
        if lora_config is not None and device.type == "cuda":
            from pagedllm.lora.manager import plan_capacity

            lora_plan_blocks = plan_capacity(max_tokens, lora_config)
        self.buffers = InputBuffers(max_tokens, scheduler_config.max_num_seqs, max_num_blocks, device,
                                    lora_plan_blocks)
        self.lora: LoRAManager | None = None  # --- lora: wraps the linears; the adapters of each step
        if lora_config is not None:
            from pagedllm.lora.manager import LoRAManager

            self.lora = LoRAManager(self.model, lora_config, self.buffers if lora_plan_blocks else None, device,
                                    self.dtype)
        self.proposer: Proposer | None = None
        self.draft: DraftModel | None = None  # a draft model drafts inside the verifying step
        spec = scheduler_config.speculative_config
        if spec is not None:
            spec.check_implemented()
            self.rejection_sampler = RejectionSampler()
            if spec.method == "draft_model":
                self.draft = DraftModel(spec, model_config, device, self.attn_backend, self.block_size)
            else:
                self.proposer = NgramProposer(spec)
        # Async scheduling: the tokens the step in flight samples, fed to the next step on the device.
        self._pending: PendingTokens | None = None

    # ---- KV cache ----------------------------------------------------------
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, tuple[int, ...]]:
        """(num_layers, the shape of one layer's KV cache on this rank)."""
        from pagedllm.models.registry import kv_cache_shape_info

        p = self.parallel
        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(self.model_config.hf_config, p.tp_size,
                                                                 p.pp_rank, p.pp_size)
        return num_layers, (num_blocks, 2, self.block_size, num_kv_heads, head_dim)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's element type: the model dtype, fp8 (``--kv-cache-dtype fp8``), or bf16 on the CPU
        fast path (``cpu_bf16``: half the bytes of fp32, so twice the blocks in ``--cpu-kv-cache-gib``)."""
        if self.cache_config.cache_dtype == "fp8":
            return torch.float8_e4m3fn
        return torch.bfloat16 if self.model_config.quantization == "cpu_bf16" else self.dtype

    def kv_cache_bytes_per_block(self) -> int:
        num_layers, shape = self.kv_cache_shape(1)
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        draft = self.draft.bytes_per_block(self.kv_dtype) if self.draft is not None else 0
        return num_layers * math.prod(shape) * elem + draft

    def initialize_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        self.kv_caches = self._alloc_kv(num_blocks)
        if self.draft is not None:
            self.draft.allocate(num_blocks, self.kv_dtype)
        self.swap_space = SwapSpace(self.kv_caches, num_cpu_blocks) if num_cpu_blocks else None
        if self.device.type == "cuda":
            self.warm_up_prefill()
        if self.use_cuda_graphs:
            self.graphs = CudaGraphRunner(self.model, self.kv_caches, self.buffers, self.model_config.max_model_len,
                                          max_batch_size=self.scheduler_config.max_num_seqs)
            if self.lora is not None:  # the graphs read each token's adapter slot from the input buffers
                with self.lora.capturing():
                    self.graphs.capture()
            else:
                self.graphs.capture()

    # ---- one step ----------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._pending = None  # a synchronous step: the rows hold every token
        self._apply_diff(sched)
        if self.draft is not None:
            self.draft.forget(sched.finished_req_ids | set(sched.preempted_req_ids))
            if sched.scheduled_spec_decode_tokens:  # the placeholders get the draft model's tokens
                self.draft.propose(sched.scheduled_spec_decode_tokens, self.input_batch, self.buffers)
        if sched.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        batch = self.input_batch.prepare(sched.num_scheduled_tokens, self.block_size,
                                         sched.scheduled_spec_decode_tokens)
        if self.lora is not None:
            self.lora.prepare(batch, self.input_batch)
        hidden, logits_indices = self._forward(batch)  # queued on the GPU, not finished
        out = ModelRunnerOutput(req_ids=batch.req_ids, sampled_token_ids=[[] for _ in batch.req_ids])
        if not self.parallel.is_last_stage:  # the activations went on to the next stage
            return out
        if len(batch.logits_indices):
            # Host work that overlaps the forward: no sync until the sampled ids are read.
            md = self.input_batch.sampling_metadata(batch)
            md.add_grammar_bitmask(sched.grammar_bitmask, batch.req_ids, batch.num_sampled_tokens)  # structured outputs
            if batch.draft_ids is not None:
                self._verify(batch, md, hidden[logits_indices], out)
            else:
                self._sample(batch, md, hidden[logits_indices], out)
        self._maybe_prompt_logprobs(batch, hidden, out)
        if self.proposer is not None:
            self._propose(batch, out)
        elif self.draft is not None:  # the next step drafts; the scheduler needs only how many
            out.spec_token_ids = {batch.req_ids[i]: self.draft.placeholder_drafts(self.draft.k)
                                  for i, toks in enumerate(out.sampled_token_ids) if toks}
        return out

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> StepHandle:
        """Launch one step and return without waiting for its sampled ids (async scheduling).

        The caller schedules and launches the next step before it calls ``get()`` on this one.
        Requests here never need their previous tokens on the host (the scheduler runs those
        steps synchronously), and no step carries drafts or a grammar bitmask."""
        # The previous step's tokens feed this step only: the host reads them before the next one.
        pending, self._pending = self._pending, None
        self._apply_diff(sched)
        if pending is not None:  # a finished request's token goes nowhere: its id may be a new request's now
            pending.drop(sched.finished_req_ids)
        if sched.total_num_scheduled_tokens == 0:
            return DoneStep(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        batch = self.input_batch.prepare(sched.num_scheduled_tokens, self.block_size)
        if self.lora is not None:
            self.lora.prepare(batch, self.input_batch)
        if pending is not None:
            batch.input_id_patch = pending.feed(batch, self.device)
        hidden, logits_indices = self._forward(batch)
        out = ModelRunnerOutput(req_ids=batch.req_ids, sampled_token_ids=[[] for _ in batch.req_ids])
        self._maybe_prompt_logprobs(batch, hidden, out)
        if not len(batch.logits_indices):
            return DoneStep(out)
        md = self.input_batch.sampling_metadata(batch)
        result = self.sampler(self.model.compute_logits(hidden[logits_indices]), md)
        self._pending, sampling_reqs = reserve_slots(self.input_batch, batch, result.sampled_token_ids)
        finish_logprobs = None
        if result.logprob_token_ids is not None:  # read after the sync; the rows may have moved by then
            num_logprobs = self.input_batch.sampling.num_logprobs[batch.rows].copy()
            counts = [1] * len(sampling_reqs)

            def finish_logprobs(out: ModelRunnerOutput) -> None:
                self._logprobs(batch, result, sampling_reqs, counts, out, num_logprobs)
        return DeferredStep(self.input_batch, out, self._pending, sampling_reqs, finish_logprobs)

    def _apply_diff(self, sched: SchedulerOutput) -> None:
        """The scheduler's diff into the rows, then the step's block copies and swaps."""
        self.input_batch.update_states(sched)
        # Order matters. Copies first: a copy's source may be freed this step and reused as a
        # swap-in target, and a forked request swapped out this step must take its copied block.
        if sched.blocks_to_copy:
            self._copy_blocks(sched.blocks_to_copy)
        if sched.blocks_to_swap_out:
            self.swap_space.swap_out(sched.blocks_to_swap_out)
        if sched.blocks_to_swap_in:
            self.swap_space.swap_in(sched.blocks_to_swap_in)

    def _maybe_prompt_logprobs(self, batch: FlatBatch, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        sampling = self.input_batch.sampling
        if sampling.num_on["num_prompt_logprobs"] and (sampling.num_prompt_logprobs[batch.rows] >= 0).any():
            self._prompt_logprobs(batch, hidden, out)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate KV blocks (src -> dst) in every layer."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for kv in self.kv_caches:
            kv = kv_bytes(kv)
            kv.index_copy_(0, dst, kv.index_select(0, src))

    def _forward(self, batch: FlatBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (num_tokens, hidden_size), logits_indices (num_sampled,)) on the device."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self._forward_eager(batch)

    def _forward_eager(self, batch: FlatBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A stage before the last sends its (hidden, residual) on and returns None for hidden."""
        input_ids, positions, md, logits_indices = self.buffers.load(batch)
        p = self.parallel
        intermediate = None
        if not p.is_first_stage:
            intermediate = recv_activations(len(batch.input_ids), self.model_config.hf_config.hidden_size,
                                            self.dtype, self.device)
        with step_shape(len(batch.req_ids), batch.decoding):  # cpu_bf16's int4 weights: small decode steps
            hidden = self.model(input_ids, positions, self.kv_caches, md, intermediate)
        if not p.is_last_stage:
            send_activations(hidden)
            return None, logits_indices
        return hidden, logits_indices

    def _sample(self, batch: FlatBatch, md: SamplingMetadata, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """Sample ``hidden``'s rows (the sampled positions, in ``logits_indices`` order) into ``out``."""
        logits = self.model.compute_logits(hidden)  # (num_sampled, vocab) fp32
        result = self.sampler(logits, md)
        sampled = result.sampled_token_ids.cpu().numpy()  # the step's one host sync
        self.input_batch.append_sampled(batch, sampled)
        tokens = sampled.tolist()
        if batch.one_sample_each and result.logprob_token_ids is None:
            out.sampled_token_ids = [[t] for t in tokens]
            return
        sampling_reqs = np.flatnonzero(batch.num_sampled_tokens).tolist()
        counts = batch.num_sampled_tokens[sampling_reqs].tolist()
        k = 0
        for i, count in zip(sampling_reqs, counts):
            out.sampled_token_ids[i] = tokens[k:k + count]
            k += count
        if result.logprob_token_ids is not None:
            self._logprobs(batch, result, sampling_reqs, counts, out)

    def _verify(self, batch: FlatBatch, md: SamplingMetadata, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """Speculative decoding: verify each request's drafts at its k + 1 sampled positions."""
        logits = self.model.compute_logits(hidden)  # (sum of k + 1, vocab) fp32
        sampling_reqs = np.flatnonzero(batch.num_sampled_tokens)
        result = self.rejection_sampler(logits, md, batch.draft_ids, batch.num_sampled_tokens[sampling_reqs])
        self.input_batch.append_token_lists(batch.rows[sampling_reqs], result.token_ids)
        num_logprobs = self.input_batch.sampling.num_logprobs
        for j, i in enumerate(sampling_reqs.tolist()):
            out.sampled_token_ids[i] = result.token_ids[j]
            n = int(num_logprobs[batch.rows[i]])
            if result.logprobs is not None and n >= 0:
                lp = result.logprobs[j]
                out.logprobs[batch.req_ids[i]] = LogprobsLists(
                    [ids[:n + 1] for ids in lp.token_ids], [v[:n + 1] for v in lp.logprobs], lp.ranks)

    def _propose(self, batch: FlatBatch, out: ModelRunnerOutput) -> None:
        """Draft the next tokens of every request that got tokens this step (from its row's tokens)."""
        ib = self.input_batch
        reqs = [i for i, toks in enumerate(out.sampled_token_ids) if toks]
        rows = batch.rows[reqs].tolist()
        drafts = self.proposer.propose([ib.token_ids[row, :ib.num_tokens[row]] for row in rows])
        out.spec_token_ids = {batch.req_ids[i]: d for i, d in zip(reqs, drafts) if d}

    def _logprobs(self, batch: FlatBatch, result: SamplerOutput, sampling_reqs: list[int], counts: list[int],
                  out: ModelRunnerOutput, num_logprobs: np.ndarray | None = None) -> None:
        """``num_logprobs``: per request of ``batch``, as asked (default: read from the rows now)."""
        ids, lps, ranks = (result.logprob_token_ids.tolist(), result.logprobs.tolist(),
                           result.sampled_ranks.tolist())
        if num_logprobs is None:
            num_logprobs = self.input_batch.sampling.num_logprobs[batch.rows]
        k = 0
        for i, count in zip(sampling_reqs, counts):
            n = int(num_logprobs[i])
            if n >= 0:
                rows = range(k, k + count)
                out.logprobs[batch.req_ids[i]] = LogprobsLists(
                    [ids[r][:n + 1] for r in rows], [lps[r][:n + 1] for r in rows], [ranks[r] for r in rows])
            k += count

    def _prompt_logprobs(self, batch: FlatBatch, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """Logprobs of each prompt token given its prefix, for requests that asked for them."""
        ib = self.input_batch
        for i in np.flatnonzero(ib.sampling.num_prompt_logprobs[batch.rows] >= 0).tolist():
            row = int(batch.rows[i])
            k = int(ib.sampling.num_prompt_logprobs[row])
            num_prompt = int(ib.num_prompt_tokens[row])
            start = int(batch.positions[batch.query_start_loc[i]])
            end = min(int(batch.seq_lens[i]), num_prompt - 1)  # positions whose next token is in the prompt
            if start >= end:
                continue
            q0 = int(batch.query_start_loc[i])
            logits = self.model.compute_logits(hidden[q0:q0 + end - start])
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.from_numpy(ib.token_ids[row, start + 1:end + 1].astype(np.int64)).to(logprobs.device)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > chosen).sum(-1) + 1
            top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], targets[:, None][:, :0])
            ids = torch.cat([targets[:, None], top_ids], 1).tolist()
            lps = torch.cat([chosen, top_lp], 1).tolist()
            out.prompt_logprobs[batch.req_ids[i]] = LogprobsLists(ids, lps, ranks.tolist())

    # ---- profiling ---------------------------------------------------------
    @torch.inference_mode()
    def profile_run(self) -> int:
        """A forward and a sampling pass at the largest batch the scheduler can form, to measure
        peak activation memory. Returns the bytes of the scratch KV cache it used (just big
        enough for the synthetic prompts, freed after), which are not activations."""
        from pagedllm.sampling_params import SamplingParams

        num_tokens = self.scheduler_config.max_num_batched_tokens
        num_seqs = min(self.scheduler_config.max_num_seqs, num_tokens)
        counts = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        counts[-1] += num_tokens - counts.sum()
        batch = self._synthetic_prefill(np.minimum(counts, self.model_config.max_model_len))
        num_seqs, blocks_per_seq = batch.block_tables.shape
        real_caches = self.kv_caches
        self.kv_caches = self._alloc_kv(num_seqs * blocks_per_seq)
        scratch_bytes = num_seqs * blocks_per_seq * self.kv_cache_bytes_per_block()
        try:
            hidden, logits_indices = self._forward_eager(batch)
            if hidden is not None:  # a pipeline stage before the last samples nothing
                logits = self.model.compute_logits(hidden[logits_indices])
                # The heaviest sampling path (temperature, top-k and top-p: a sort of the logits).
                params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
                md = SamplingMetadata.build([params] * num_seqs, [[0]] * num_seqs, [[]] * num_seqs, {}, None,
                                            self.vocab_size, self.device)
                self.sampler(logits, md)
                del logits
            del hidden
        finally:
            self.kv_caches = real_caches
        return scratch_bytes

    def _synthetic_prefill(self, counts: np.ndarray) -> FlatBatch:
        """A batch of fresh prompts of ``counts`` tokens (token id 0), each in its own run of blocks
        from block 0 on."""
        num_seqs = len(counts)
        blocks_per_seq = int(-(-counts.max() // self.block_size))
        block_tables = np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        req_of_token = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(len(req_of_token)) - qsl[:-1][req_of_token]
        slots = block_tables[req_of_token, positions // self.block_size].astype(np.int64) * self.block_size
        num_sampled = np.ones(num_seqs, dtype=np.int64)
        return FlatBatch(
            req_ids=[str(i) for i in range(num_seqs)], rows=np.arange(num_seqs),
            input_ids=np.zeros(len(positions), dtype=np.int64), positions=positions.astype(np.int64),
            slot_mapping=slots + positions % self.block_size, query_start_loc=qsl, seq_lens=counts.astype(np.int32),
            block_tables=block_tables, num_sampled_tokens=num_sampled,
            logits_indices=flat_logits_indices(qsl, num_sampled), max_query_len=int(counts.max()),
            max_seq_len=int(counts.max()))

    @torch.inference_mode()
    def warm_up_prefill(self) -> None:
        """Run a short prompt of each length class the attention kernels are specialized for
        (``2 .. 64`` tokens: the Triton prefill kernel compiles one variant per query block size),
        so that no kernel compiles in the middle of serving. Before any request: the blocks written
        are free."""
        limit = min(64, self.scheduler_config.max_num_batched_tokens, self.model_config.max_model_len)
        start = time.perf_counter()
        for q_len in (2, 4, 8, 16, 32, 64):
            if q_len <= limit:
                self._forward_eager(self._synthetic_prefill(np.array([q_len], dtype=np.int64)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info("prefill kernels warmed up in %.1f s", time.perf_counter() - start)

    def _alloc_kv(self, num_blocks: int) -> list[torch.Tensor]:
        num_layers, shape = self.kv_cache_shape(num_blocks)
        return [zeros_on_demand(shape, self.kv_dtype, self.device) for _ in range(num_layers)]


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU its memory is an anonymous mapping: the kernel hands out zeroed pages
    as they are first written, so a KV cache counts in the process's resident memory as blocks are
    used, not all at start (``--cpu-kv-cache-gib`` is a ceiling, not a cost). Elsewhere ``torch.zeros``."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import mmap

    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # frombuffer keeps the mapping alive as long as the tensor (and its views) live.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)

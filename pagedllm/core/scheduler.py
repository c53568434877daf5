"""Scheduler: continuous batching with one token budget per step.

Each step spends ``max_num_batched_tokens`` first on running requests (a decode
costs 1 token, an unfinished prompt the rest of it; ``_schedule_running``), then on
waiting ones (``_schedule_waiting``). A prompt longer than what is left of the
budget is prefilled in chunks over several steps. When the KV cache runs out of
blocks the policy's victim among running requests (FCFS: the newest; priority: the
highest (priority, arrival)) is preempted: its KV is swapped to CPU blocks when
``preemption_mode`` is "swap" and there is room, else its blocks are freed and it is
recomputed later (its prefix may still hit the prefix cache). The policy is the
waiting queue object (core/request_queue.py), chosen once at construction.

Request states (RequestStatus) and where the scheduler moves a request between them:

    add_request ─► WAITING ◄── blocks taken back ── FORKED ◄── fork_request, or a sample
                      │      (_drop_waiting_forks)    │       released by its source
                      ├◄──────────────────────────────┘       (KV shared with the source)
       PREEMPTED ────►┤ admitted (_schedule_waiting)
       (KV freed)     │
       SWAPPED ──────►┤
       (KV on CPU)    ▼
          ▲        RUNNING ── update_from_output() ──► FINISHED_STOPPED / FINISHED_LENGTH_CAPPED
          │         │  └── pause_request ──► PAUSED (beam search: keeps its blocks, never resumes)
          └─────────┘ preempted when out of blocks (_preempt): SWAPPED when preemption_mode
                      is "swap" and the CPU pool has room, else PREEMPTED

finish_requests (abort, stop string) takes a request from any state to FINISHED_*.
WAITING, FORKED, SWAPPED and PREEMPTED requests sit in the waiting queue; forked and
swapped ones resume from their KV (no prefix-cache lookup).

Speculative decoding: a decoding request's drafts (``Request.spec_token_ids``, proposed
by the runner after the previous step) ride along as extra query tokens of its decode:

    scheduled:  [last token, d1 .. dk]      k+1 tokens of the budget, lookahead slots allocated
    verified:   d1 .. dm accepted, then one token sampled after them (m+1 new tokens)
    afterwards: num_computed_tokens = old + 1 + m (the k - m rejected positions roll back),
                blocks holding only rejected positions go back to the pool

Drafts never enter ``all_token_ids``, so prefix-cache hashes cover accepted tokens only,
and stop conditions are checked after every accepted token (the rest is dropped).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.block_pool import CpuBlockPool, KVCacheBlock
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.outputs import (
    CachedRequestData,
    LogprobsLists,
    ModelRunnerOutput,
    NewRequestData,
    RequestUpdate,
    SchedulerOutput,
    SchedulerStats,
    SpecDecodingStats,
)
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.request_queue import RequestQueue, make_request_queue
from pagedllm.sampling_params import SamplingParams

# Waiting requests whose computed KV already exists (GPU blocks, or CPU blocks to swap in).
_RESUMES_FROM_KV = (RequestStatus.FORKED, RequestStatus.SWAPPED)


@dataclass
class _StepPlan:
    """What one schedule() call has decided so far: the budget left and the requests it took."""

    budget: int
    max_reqs: int  # requests in this step (pipeline parallel: a share of max_num_seqs per batch in flight)
    num_scheduled: dict[str, int] = field(default_factory=dict)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)  # drafts scheduled per request


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 num_cpu_blocks: int = 0) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, self.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        # The scheduling policy: the waiting queue's order and the preemption victim choice.
        self.waiting: RequestQueue = make_request_queue(config.policy)
        self.running: list[Request] = []
        self.paused: dict[str, Request] = {}
        # Requests the runner has state for; a preempted one is re-sent as resumed.
        self._sent_to_runner: set[str] = set()
        self._finished_since_last_step: set[str] = set()
        self.num_preemptions = 0
        # Parallel samples waiting for their source request's prompt KV (see add_request).
        self.fork_waiters: dict[str, list[Request]] = {}
        self._blocks_to_copy: list[tuple[int, int]] = []
        # Swap preemption: CPU blocks (ids into the runner's CPU cache) per swapped-out request.
        self._swap_enabled = config.preemption_mode == "swap"
        self.cpu_block_pool = CpuBlockPool(num_cpu_blocks)
        self._blocks_to_swap_out: list[tuple[int, int]] = []  # (gpu block, cpu block)
        self._blocks_to_swap_in: list[tuple[int, int]] = []  # (cpu block, gpu block)
        self.spec_stats = SpecDecodingStats() if config.num_speculative_tokens else None
        # Requests whose lookahead blocks were given back: req_id -> blocks kept, for the runner's table.
        self._kept_blocks: dict[str, int] = {}
        # Async scheduling (see ``schedule``): the requests whose sampling reads their previous
        # tokens on the host (penalties, min_tokens, bad words, grammars) need synchronous steps.
        self.async_scheduling = config.async_scheduling
        self._needs_host_tokens: set[str] = set()
        # Async scheduling: req_id -> outputs still to come from steps scheduled before that request
        # finished. They are its outputs, dropped, not a later request's that reuses the id.
        self._owed_to_finished: dict[str, int] = {}

    # ---- admission ---------------------------------------------------------
    def add_request(self, request: Request, fork_from: str | None = None) -> None:
        """Queue a request; raise ValueError if it could never be served.

        With `fork_from`, the request has the same prompt as that (earlier) request and
        waits until it has computed the prompt, then shares its KV blocks (the n > 1
        samples of one prompt are computed once)."""
        self._check_admissible(request)
        self.requests[request.request_id] = request
        if _reads_host_tokens(request.sampling_params):
            self._needs_host_tokens.add(request.request_id)
        source = self.requests.get(fork_from) if fork_from is not None else None
        if source is not None and not source.is_finished() and source.prompt_token_ids == request.prompt_token_ids:
            self.fork_waiters.setdefault(source.request_id, []).append(request)
        else:
            self.waiting.add(request)

    def _check_admissible(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        request.max_tokens = self.check_length(request.num_prompt_tokens, request.max_tokens)

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The one length/block admission check: ValueError if a prompt of this length with
        `max_tokens` could never be served; returns max_tokens (None: what the context leaves)."""
        max_len = self.config.max_model_len
        if num_prompt_tokens == 0:
            raise ValueError("prompt must contain at least one token")
        if max_tokens is None:
            max_tokens = max(max_len - num_prompt_tokens, 1)
        total = num_prompt_tokens + max_tokens
        if num_prompt_tokens >= max_len or total > max_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{total}, over the model's maximum context length of {max_len} tokens")
        num_blocks_needed = -(-total // self.block_size)
        if num_blocks_needed > self.kv_cache_manager.num_blocks:
            raise ValueError(
                f"prompt plus max_tokens ({total} tokens) needs {num_blocks_needed} KV cache blocks but the "
                f"cache only has {self.kv_cache_manager.num_blocks}; lower max_tokens")
        return max_tokens

    def fork_request(self, parent_id: str, child: Request) -> bool:
        """Start `child` from the KV of running request `parent_id` (beam search).

        The child's tokens must extend the parent's computed tokens; it shares those
        blocks (copy-on-write for a partial last block). False if no block was free."""
        parent = self.requests[parent_id]
        num_shared = min(parent.num_computed_tokens, child.num_tokens - 1)
        if child.all_token_ids[:num_shared] != parent.all_token_ids[:num_shared]:
            raise ValueError("fork: the child's tokens must extend the parent's")
        self._check_admissible(child)
        copies = self.kv_cache_manager.fork(parent, child, num_shared)
        if copies is None:
            return False
        self._blocks_to_copy.extend(copies)
        self._mark_forked(child, num_shared)
        self.requests[child.request_id] = child
        self.waiting.prepend(child)
        return True

    def pause_request(self, request_id: str) -> None:
        """Stop scheduling a running request but keep its KV blocks (so others can fork from it)."""
        req = self.requests[request_id]
        if req.status != RequestStatus.RUNNING:
            return  # preempted meanwhile (waiting, swapped or to recompute): nothing to pause
        self.running.remove(req)
        req.status = RequestStatus.PAUSED
        self.paused[request_id] = req

    def _release_fork_waiters(self, source: Request) -> None:
        """Fork the samples waiting on `source` once its prompt (but the last token) is computed."""
        waiters = self.fork_waiters.get(source.request_id)
        if not waiters:
            self.fork_waiters.pop(source.request_id, None)
            return
        ready = [w for w in waiters if source.num_computed_tokens >= w.num_prompt_tokens - 1 or source.is_finished()]
        for child in reversed(ready):  # each goes to the front: keep their order
            waiters.remove(child)
            copies = None
            if not source.is_finished():
                copies = self.kv_cache_manager.fork(source, child, child.num_prompt_tokens - 1)
            if copies is None:  # no copy possible: an ordinary prefill
                self.waiting.add(child)
                continue
            self._blocks_to_copy.extend(copies)
            self._mark_forked(child, child.num_prompt_tokens - 1)
            self.waiting.prepend(child)
        if not waiters:
            del self.fork_waiters[source.request_id]

    @staticmethod
    def _mark_forked(child: Request, num_shared: int) -> None:
        """A child given its source's KV for its first `num_shared` tokens resumes from it."""
        child.num_computed_tokens = num_shared
        # Sharing no token (a one-token prompt) leaves an ordinary prefill.
        child.status = RequestStatus.FORKED if num_shared > 0 else RequestStatus.WAITING

    # ---- one step ----------------------------------------------------------
    @property
    def needs_sync_step(self) -> bool:
        """Some request's sampling needs its previous tokens on the host: no step may run ahead."""
        return bool(self._needs_host_tokens) or bool(self.paused)

    def schedule(self) -> SchedulerOutput:
        """Spend one step's token budget: running requests first, then waiting ones; the diff for the runner.

        Async scheduling: this runs while the previous step is still on the GPU. Scheduled tokens
        count as computed at once, and a step that reaches a request's last position adds an
        output placeholder: the next step computes that position with the token the GPU feeds
        it, and ``update_from_output`` swaps the placeholder for the token when it arrives."""
        # Pipeline parallel: each batch in flight takes its share of the sequences, so the stages all have one.
        depth = self.config.max_concurrent_batches if self.async_scheduling else 1
        plan = _StepPlan(self.config.max_num_batched_tokens, max_reqs=-(-self.config.max_num_seqs // depth))
        self._schedule_running(plan)
        if not plan.preempted:  # a step that had to preempt admits nothing new
            self._schedule_waiting(plan)
        out = SchedulerOutput(
            scheduled_new_reqs=plan.new_reqs,
            scheduled_cached_reqs=plan.cached_reqs,
            num_scheduled_tokens=plan.num_scheduled,
            total_num_scheduled_tokens=sum(plan.num_scheduled.values()),
            finished_req_ids=self._finished_since_last_step,
            preempted_req_ids=plan.preempted,
            blocks_to_copy=self._blocks_to_copy,
            blocks_to_swap_out=self._blocks_to_swap_out,
            blocks_to_swap_in=self._blocks_to_swap_in,
            scheduled_spec_decode_tokens=plan.spec_tokens,
        )
        self._finished_since_last_step = set()
        self._blocks_to_copy = []
        self._blocks_to_swap_out = []
        self._blocks_to_swap_in = []
        if self.async_scheduling:
            self._advance_scheduled(plan.num_scheduled)
        return out

    def _advance_scheduled(self, num_scheduled: dict[str, int]) -> None:
        """Async scheduling: count the step's tokens as computed now, and a placeholder for each
        request whose step samples (its chunk reaches its last position).

        Each placeholder is the token of a step in flight; the runner reserved a slot for it in the
        same step (its row's ``num_tokens`` is ``num_tokens + num_output_placeholders`` here). A
        placeholder that outlives its step means the two disagree: fail loudly, not loop forever."""
        for req_id, n in num_scheduled.items():
            req = self.requests[req_id]
            req.num_computed_tokens += n
            req.num_steps_in_flight += 1
            if req.num_computed_tokens >= req.num_tokens + req.num_output_placeholders:
                req.num_output_placeholders += 1
                if req.num_output_placeholders > req.num_steps_in_flight:
                    raise RuntimeError(
                        f"internal error (async scheduling): {req!r} has {req.num_output_placeholders} output "
                        f"placeholders but {req.num_steps_in_flight} steps in flight; a step did not sample it")
            self._release_fork_waiters(req)

    def _final_length(self, req: Request) -> int:
        """The token count at which ``req`` ends by length."""
        max_tokens = req.max_tokens if req.max_tokens is not None else self.config.max_model_len
        return min(self.config.max_model_len, req.num_prompt_tokens + max_tokens)

    def _schedule_running(self, plan: _StepPlan) -> None:
        """Decodes and unfinished chunked prefills, in admission order, preempting as blocks run out."""
        # Locals, not plan attributes, in this loop: it runs once per running request per step.
        budget = plan.budget
        num_scheduled, cached_reqs, preempted = plan.num_scheduled, plan.cached_reqs, plan.preempted
        scheduled_running: list[Request] = []
        for req in list(self.running):
            if budget <= 0 or len(num_scheduled) >= plan.max_reqs:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.num_steps_in_flight and self.config.max_concurrent_batches > 1:
                continue  # pipeline parallel: its token comes from a batch still in the pipeline
            placeholders = req.num_output_placeholders
            if placeholders and req.num_tokens + placeholders >= self._final_length(req):
                continue  # async: the token in flight ends it by length; nothing more to compute
            num_new = min(req.num_tokens + placeholders - req.num_computed_tokens, budget)
            drafts, new_blocks = self._allocate_lookahead(req, num_new, budget)
            if new_blocks is None:
                num_preempted = len(preempted)
                new_blocks = self._allocate_or_preempt(req, num_new, preempted)
                if len(preempted) > num_preempted:
                    budget += self._unschedule_preempted(plan, scheduled_running)
                if new_blocks is None:  # req itself was preempted
                    continue
            num_new += len(drafts)
            scheduled_running.append(req)
            if drafts:
                plan.spec_tokens[req.request_id] = drafts
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            cached_reqs.append(CachedRequestData(
                req.request_id, False, [b.block_id for b in new_blocks], req.num_computed_tokens,
                self._kept_blocks.pop(req.request_id, -1)))
        plan.budget = budget

    @staticmethod
    def _unschedule_preempted(plan: _StepPlan, scheduled_running: list[Request]) -> int:
        """A victim that was already scheduled this step gives its tokens back; returns how many."""
        num_returned = 0
        for victim in [r for r in scheduled_running if r.request_id in plan.preempted]:
            scheduled_running.remove(victim)
            num_returned += plan.num_scheduled.pop(victim.request_id)
            plan.spec_tokens.pop(victim.request_id, None)
        plan.cached_reqs[:] = [c for c in plan.cached_reqs if c.req_id not in plan.preempted]
        return num_returned

    def _allocate_lookahead(self, req: Request, num_new: int, budget: int
                            ) -> tuple[list[int], list[KVCacheBlock] | None]:
        """(drafts, new blocks) when ``req`` verifies drafts this step and free blocks hold their
        lookahead slots, else ([], None). Drafts never preempt anyone: without room they are dropped."""
        drafts = self._drafts_to_verify(req, num_new, budget)
        if not drafts:
            return [], None
        new_blocks = self.kv_cache_manager.allocate_slots(req, num_new + len(drafts))
        return (drafts, new_blocks) if new_blocks is not None else ([], None)

    def _drafts_to_verify(self, req: Request, num_new: int, budget: int) -> list[int]:
        """The drafts to verify with ``req``'s decode this step: only on a plain decode (one known
        token to compute), cut to what the budget, ``max_tokens`` and the context length leave."""
        drafts = req.spec_token_ids
        if not drafts or num_new != 1 or req.num_tokens - req.num_computed_tokens != 1 or req.pause_after_sample:
            return []
        # All k accepted emit k + 1 tokens; the last draft's position must fit the context.
        room = min(budget - 1, req.max_tokens - req.num_output_tokens - 1,
                   self.config.max_model_len - req.num_tokens)
        return drafts[:max(room, 0)]

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests in the queue's order while budget, blocks and max_num_seqs allow."""
        # --- lora: at most max_loras distinct adapters run at once (the runner's device slots);
        # a request whose adapter finds no slot waits, skipped over, in its place in the queue.
        lora_config = self.config.lora_config
        active_loras = {r.lora_int_id for r in self.running} - {0} if lora_config else set()
        skipped: list[Request] = []
        while (self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(plan.num_scheduled) < plan.max_reqs):
            req = self.waiting.peek()
            if (lora_config and req.lora_int_id and req.lora_int_id not in active_loras
                    and len(active_loras) >= lora_config.max_loras):
                skipped.append(self.waiting.pop())
                continue
            if req.num_steps_in_flight:  # preempted beside a step still in the pipeline: resume with its token
                skipped.append(self.waiting.pop())
                continue
            if req.status in _RESUMES_FROM_KV:  # its KV is in place (forked) or on the CPU (swapped)
                hit_blocks, num_hit = [], req.num_computed_tokens
            else:
                hit_blocks, num_hit = self.kv_cache_manager.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hit, plan.budget)
            new_blocks = self.kv_cache_manager.allocate_slots(req, num_new, hit_blocks)
            if new_blocks is None:
                # Nothing running will free a block: take back what waiting forks and paused
                # beams hold (they recompute later; the prefix cache may still hit).
                if self.running or not (self._drop_waiting_forks(keep=req) or self._release_paused()):
                    break
                continue
            self.waiting.pop()
            self._admit(req, plan, num_hit, num_new, new_blocks)
            if req.lora_int_id:
                active_loras.add(req.lora_int_id)
        for req in reversed(skipped):
            self.waiting.prepend(req)

    def _admit(self, req: Request, plan: _StepPlan, num_hit: int, num_new: int,
               new_blocks: list[KVCacheBlock]) -> None:
        """Move a waiting request whose blocks are allocated into running, scheduled for `num_new` tokens."""
        resumes_from_kv = req.status in _RESUMES_FROM_KV
        if req.status == RequestStatus.SWAPPED:
            cpu_blocks = self.cpu_block_pool.free(req.request_id)
            self._blocks_to_swap_in.extend(zip(cpu_blocks, (b.block_id for b in new_blocks)))
        req.num_computed_tokens = num_hit
        if req.num_cached_tokens < 0:  # first admission
            req.num_cached_tokens = num_hit
            kv = self.kv_cache_manager
            if not resumes_from_kv and kv.enable_caching and req.sampling_params.prompt_logprobs is None:
                kv.record_prefix_lookup(req.num_tokens, num_hit)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        plan.num_scheduled[req.request_id] = num_new
        plan.budget -= num_new
        block_ids = self.kv_cache_manager.get_block_ids(req.request_id)
        if req.request_id in self._sent_to_runner:
            plan.cached_reqs.append(CachedRequestData(req.request_id, True, block_ids, num_hit))
        else:
            self._sent_to_runner.add(req.request_id)
            plan.new_reqs.append(NewRequestData(
                req.request_id, req.prompt_token_ids, req.sampling_params, block_ids, num_hit,
                list(req.output_token_ids), req.lora_request))

    def _drop_waiting_forks(self, keep: Request) -> bool:
        """Turn waiting forked requests back into plain prefills (prefix caching may still hit)."""
        dropped = set()
        for r in self.waiting:
            if r is not keep and r.status == RequestStatus.FORKED:
                dropped.update(self.kv_cache_manager.get_block_ids(r.request_id))
                self.kv_cache_manager.free(r)
                r.num_computed_tokens = 0
                r.status = RequestStatus.WAITING
        self._blocks_to_copy = [(s, d) for s, d in self._blocks_to_copy if d not in dropped]
        return bool(dropped)

    def _release_paused(self) -> bool:
        """Free the blocks of paused requests; a later fork from one recomputes instead of sharing."""
        released = False
        for req in self.paused.values():
            if self.kv_cache_manager.get_block_ids(req.request_id):
                self.kv_cache_manager.free(req)
                req.num_computed_tokens = 0
                released = True
        return released

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: set[str]) -> list[KVCacheBlock] | None:
        """Allocate blocks for `req`, preempting the policy's victims among running requests as needed.

        Returns the new blocks, or None if `req` itself had to be preempted."""
        while True:
            new_blocks = self.kv_cache_manager.allocate_slots(req, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self.waiting.pick_victim(self.running)
            if victim is req and (self._drop_waiting_forks(keep=req) or self._release_paused()):
                continue  # blocks held by requests that are not running came back: retry before preempting
            self._preempt(victim)
            preempted.add(victim.request_id)
            if victim is req:
                return None

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks: SWAPPED to the CPU (keeping its progress) when
        preemption_mode is "swap" and the swap space has room, else PREEMPTED (recomputed later)."""
        self.running.remove(req)
        self._kept_blocks.pop(req.request_id, None)  # a resumed request gets its whole table again
        self.kv_cache_manager.uncache_uncomputed(req)
        if self._swap_enabled and self._swap_out(req):
            req.status = RequestStatus.SWAPPED
        else:
            req.num_computed_tokens = 0
            req.status = RequestStatus.PREEMPTED
        req.num_output_placeholders = 0  # async: its token in flight is appended when it arrives
        self.kv_cache_manager.free(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(req)

    def _swap_out(self, req: Request) -> bool:
        """Plan copying the request's computed KV blocks to free CPU blocks; False if there is no room."""
        num_blocks = -(-req.num_computed_tokens // self.block_size)
        cpu_blocks = self.cpu_block_pool.allocate(req.request_id, num_blocks)
        if cpu_blocks is None:
            return False
        gpu_blocks = self.kv_cache_manager.get_block_ids(req.request_id)[:num_blocks]
        self._blocks_to_swap_out.extend(zip(gpu_blocks, cpu_blocks))
        return True

    # ---- results -----------------------------------------------------------
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[RequestUpdate]:
        """Advance each scheduled request, append sampled tokens, and finish those that stop."""
        updates: list[RequestUpdate] = []
        sampled = dict(zip(runner_out.req_ids, runner_out.sampled_token_ids))
        spec = sched_out.scheduled_spec_decode_tokens
        for req_id, n in sched_out.num_scheduled_tokens.items():
            if self._owed_to_finished and self._drop_owed(req_id):
                continue  # the step ran a request that has finished since; the id may be a new request's
            req = self.requests.get(req_id)
            if req is None or req.is_finished():
                continue  # aborted or stopped while the step ran
            if self.async_scheduling:
                req.num_steps_in_flight -= 1
            new_ids = sampled.get(req_id, [])
            if req.status != RequestStatus.RUNNING:
                if self.async_scheduling and new_ids:  # preempted by a schedule() that ran beside this step
                    updates.append(self._late_tokens(req, new_ids, runner_out.logprobs.get(req_id)))
                continue
            if self.async_scheduling:  # tokens counted at schedule(); the placeholder becomes the token
                if new_ids:
                    req.num_output_placeholders -= 1
            else:
                drafts = spec.get(req_id)
                if drafts:  # the rejected drafts' positions were computed for nothing: roll back
                    n -= self._num_rejected(drafts, new_ids)
                req.num_computed_tokens += n
                self._release_fork_waiters(req)
            drafts = spec.get(req_id)
            logprobs = runner_out.logprobs.get(req_id)
            if new_ids:
                new_ids = self._append_checking_stops(req, new_ids)
                if logprobs is not None and len(logprobs.ranks) > len(new_ids):
                    logprobs = LogprobsLists(logprobs.token_ids[:len(new_ids)], logprobs.logprobs[:len(new_ids)],
                                             logprobs.ranks[:len(new_ids)])
                if req.pause_after_sample and not req.is_finished():
                    self.pause_request(req_id)
                elif drafts and not req.is_finished():
                    num_kept = self.kv_cache_manager.free_lookahead(req)
                    if num_kept is not None:
                        self._kept_blocks[req_id] = num_kept
            if new_ids and not req.is_finished():  # drafts for the next step, proposed after this one's tokens
                # A grammar constrains the next token only: its requests get no drafts (see ARCHITECTURE).
                if req.sampling_params.structured_outputs is None:
                    req.spec_token_ids = runner_out.spec_token_ids.get(req_id, [])
            prompt_lp = runner_out.prompt_logprobs.get(req_id)
            if new_ids or prompt_lp is not None or req.is_finished():
                updates.append(RequestUpdate(
                    req_id, new_ids, logprobs, prompt_lp,
                    finish_reason=req.get_finished_reason(), stop_reason=req.stop_reason,
                    num_cached_tokens=max(req.num_cached_tokens, 0)))
        return updates

    def _drop_owed(self, req_id: str) -> bool:
        """True (and one output fewer owed) if this output belongs to a finished request (async)."""
        left = self._owed_to_finished.get(req_id)
        if left is None:
            return False
        if left == 1:
            del self._owed_to_finished[req_id]
        else:
            self._owed_to_finished[req_id] = left - 1
        return True

    def _late_tokens(self, req: Request, new_ids: list[int], logprobs: LogprobsLists | None) -> RequestUpdate:
        """Async scheduling: the token of a request preempted while its step ran. It still counts
        (it was sampled from the right context): the request recomputes or swaps in with it."""
        new_ids = self._append_checking_stops(req, new_ids)
        if req.is_finished() and req in self.waiting:
            self.waiting.remove(req)
        return RequestUpdate(req.request_id, new_ids, logprobs, None, finish_reason=req.get_finished_reason(),
                             stop_reason=req.stop_reason, num_cached_tokens=max(req.num_cached_tokens, 0))

    def _num_rejected(self, drafts: list[int], new_ids: list[int]) -> int:
        """Drafts verified this step that were not accepted; counts the draft in the spec stats."""
        num_accepted = max(len(new_ids) - 1, 0)  # the last new token is sampled, never a draft
        if self.spec_stats is not None:
            self.spec_stats.observe(len(drafts), num_accepted)
        return len(drafts) - num_accepted

    def _append_checking_stops(self, req: Request, new_ids: list[int]) -> list[int]:
        """Append the step's tokens one at a time, stopping at the first that ends the request
        (EOS, stop id, length); returns the tokens kept. Beam requests are paused, never stopped."""
        if req.pause_after_sample:
            req.append_output_token_ids(new_ids)
            return new_ids
        for i, token in enumerate(new_ids):
            req.append_output_token_ids([token])
            status = self._check_stop(req)
            if status is not None:
                self._finish(req, status)
                return new_ids[:i + 1]
        return new_ids

    def _check_stop(self, req: Request) -> RequestStatus | None:
        params = req.sampling_params
        last = req.output_token_ids[-1]
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last == req.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if last in params.all_stop_token_ids:
                req.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside (abort, stop string); frees their blocks at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done = []
        for req_id in request_ids:
            req = self.requests.get(req_id)
            if req is None or req.is_finished():
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.PAUSED:
                del self.paused[req_id]
            elif req in self.waiting:
                self.waiting.remove(req)
            else:
                for source_id, waiters in list(self.fork_waiters.items()):
                    if req in waiters:
                        waiters.remove(req)
                        if not waiters:
                            del self.fork_waiters[source_id]
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req in self.running:
            self.running.remove(req)
        req.status = status
        if req.num_steps_in_flight:  # async: the steps' outputs still come, under an id that may come back
            owed = self._owed_to_finished
            owed[req.request_id] = owed.get(req.request_id, 0) + req.num_steps_in_flight
            req.num_steps_in_flight = 0
        self._kept_blocks.pop(req.request_id, None)
        self.kv_cache_manager.forget(req)
        self.cpu_block_pool.free(req.request_id)
        self._sent_to_runner.discard(req.request_id)
        self._needs_host_tokens.discard(req.request_id)
        self._finished_since_last_step.add(req.request_id)
        self._release_fork_waiters(req)

    def free_finished(self, request_id: str) -> None:
        """Forget a finished request once its output has been delivered."""
        self.requests.pop(request_id, None)

    # ---- introspection -----------------------------------------------------
    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            spec_decoding=self.spec_stats.copy() if self.spec_stats is not None else None,
            num_running=len(self.running), num_waiting=len(self.waiting), kv_cache_usage=kv.usage(),
            num_preemptions=self.num_preemptions, prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits, num_free_blocks=kv.block_pool.get_num_free_blocks(),
            num_total_blocks=kv.num_blocks,
            running_lora_adapters=_lora_names(self.running), waiting_lora_adapters=_lora_names(self.waiting))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.fork_waiters or self.paused)

    def get_num_unfinished_requests(self) -> int:
        return (len(self.waiting) + len(self.running) + len(self.paused)
                + sum(map(len, self.fork_waiters.values())))


def _lora_names(requests: Iterable[Request]) -> list[str]:
    """The distinct adapter names of ``requests``, sorted."""
    return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})


def _reads_host_tokens(params: SamplingParams) -> bool:
    """Sampling that reads the request's previous tokens from the host's lists: penalties,
    min_tokens (the output count), bad words (the last tokens) and grammars. Async scheduling
    runs steps for such requests synchronously."""
    return (params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1
            or params.min_tokens > 0 or bool(params.bad_words) or params.structured_outputs is not None)

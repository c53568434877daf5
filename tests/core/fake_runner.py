"""A fake model runner and a step driver for scheduler tests (pure Python, no torch).

The fake runner behaves like the real one towards the scheduler: it keeps its own
per-request state from the NewRequestData / CachedRequestData diffs, makes the
copy-on-write block copies and the swaps to and from its CPU blocks, writes each
scheduled token into a simulated paged KV cache at its slot (block table lookup),
then "attends" by reading every earlier position back through the block table and
checking it holds the right token. So a wrong block table, a block handed to two
requests at once, a missed copy or swap, or a bad prefix-cache hit shows up as a
failed assertion, not as silently wrong output. It samples only when a request's
computed tokens reach its last token (a prompt chunk that ends mid-prompt samples
nothing), and the sampled token is deterministic:
``(last_token + 1) % VOCAB``.

``Driver`` runs schedule() -> runner -> update_from_output() loops and checks the
scheduler's invariants after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.outputs import ModelRunnerOutput, RequestUpdate, SchedulerOutput
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.sampling_params import SamplingParams

VOCAB = 1000
BS = 4  # block size of the test schedulers


def next_token(last: int) -> int:
    return (last + 1) % VOCAB


def make_request(req_id: str, prompt: list[int], eos: int | None = None, priority: int = 0,
                 arrival: float | None = None, **params) -> Request:
    return Request(req_id, prompt, SamplingParams(**params), eos, arrival_time=arrival, priority=priority)


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, max_model_len: int = 128,
                   policy: str = "fcfs", caching: bool = True, num_cpu_blocks: int = 0) -> Scheduler:
    """A scheduler with tiny limits; `num_cpu_blocks` > 0 preempts by swapping to that many CPU blocks."""
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                        policy=policy, preemption_mode="swap" if num_cpu_blocks else "recompute"),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_blocks=num_blocks,
        num_cpu_blocks=num_cpu_blocks,
    )


def expected_chain(prompt: list[int], n: int) -> list[int]:
    """What the fake model generates when nothing stops it early."""
    out, last = [], prompt[-1]
    for _ in range(n):
        last = next_token(last)
        out.append(last)
    return out


@dataclass
class _RunnerReq:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


class FakeRunner:
    def __init__(self, block_size: int, scheduler: Scheduler | None = None) -> None:
        self.block_size = block_size
        self.scheduler = scheduler  # when given, block tables are cross-checked against the KV cache manager
        self.reqs: dict[str, _RunnerReq] = {}
        self.kv: dict[int, dict[int, int]] = {}  # block id -> {offset: token id}
        self.cpu_kv: dict[int, dict[int, int]] = {}  # CPU block id -> {offset: token id}

    def _apply_diff(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.reqs.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} sent as new twice"
            self.reqs[new.req_id] = _RunnerReq(list(new.prompt_token_ids) + list(new.output_token_ids),
                                               list(new.block_ids), new.num_computed_tokens)
        for cached in so.scheduled_cached_reqs:
            state = self.reqs[cached.req_id]
            if cached.resumed_from_preemption:  # recomputed from the prefix-cache hit on
                state.block_ids = list(cached.new_block_ids)
                state.num_computed_tokens = cached.num_computed_tokens
            else:
                state.block_ids.extend(cached.new_block_ids)
                assert state.num_computed_tokens == cached.num_computed_tokens, cached

    def _slot(self, state: _RunnerReq, pos: int) -> tuple[int, int]:
        assert pos // self.block_size < len(state.block_ids), "position beyond the block table"
        return state.block_ids[pos // self.block_size], pos % self.block_size

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_diff(so)
        for src, dst in so.blocks_to_copy:  # copy-on-write of forked requests, before any write
            self.kv[dst] = dict(self.kv.get(src, {}))
        for gpu, cpu in so.blocks_to_swap_out:  # then swaps, in the real runner's order
            self.cpu_kv[cpu] = dict(self.kv.get(gpu, {}))
        for cpu, gpu in so.blocks_to_swap_in:
            self.kv[gpu] = dict(self.cpu_kv[cpu])
        assert set(so.num_scheduled_tokens) == (
            {r.req_id for r in so.scheduled_new_reqs} | {r.req_id for r in so.scheduled_cached_reqs})
        written: dict[int, str] = {}
        # Like an attention layer: write every new K/V first, then attend.
        for req_id, n in so.num_scheduled_tokens.items():
            assert n > 0, f"{req_id} scheduled with {n} tokens"
            state = self.reqs[req_id]
            if self.scheduler is not None:
                assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id), (
                    f"runner's block table for {req_id} differs from the KV cache manager's")
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + n):
                block, off = self._slot(state, pos)
                assert written.setdefault(block, req_id) == req_id, f"block {block} written by two requests"
                self.kv.setdefault(block, {})[off] = state.token_ids[pos]
        req_ids, sampled = [], []
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            end = state.num_computed_tokens + n
            assert end <= len(state.token_ids), f"{req_id} scheduled past its known tokens"
            for pos in range(end):
                block, off = self._slot(state, pos)
                assert self.kv.get(block, {}).get(off) == state.token_ids[pos], (
                    f"{req_id} reads a wrong token at position {pos} (block {block})")
            state.num_computed_tokens = end
            req_ids.append(req_id)
            if end == len(state.token_ids):
                tok = next_token(state.token_ids[-1])
                state.token_ids.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])  # mid-prompt chunk: nothing to sample yet
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


class Driver:
    """Runs the scheduler with a FakeRunner, checking invariants after every step."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.runner = FakeRunner(scheduler.block_size, scheduler)
        self.steps: list[SchedulerOutput] = []  # every step's SchedulerOutput
        self.updates: list[list[RequestUpdate]] = []  # and what update_from_output returned

    def step(self) -> SchedulerOutput:
        sched = self.scheduler
        so = sched.schedule()
        self._check_schedule(so)
        check_block_accounting(sched)
        ro = self.runner.execute(so)
        ups = sched.update_from_output(so, ro)
        for req_id in self.runner.reqs.keys() & sched.requests.keys():
            req = sched.requests[req_id]
            if not req.is_finished():
                assert self.runner.reqs[req_id].token_ids == req.all_token_ids, f"runner disagrees on {req_id}"
        check_block_accounting(sched)
        self.steps.append(so)
        self.updates.append(ups)
        return so

    def _check_schedule(self, so: SchedulerOutput) -> None:
        sched, cfg = self.scheduler, self.scheduler.config
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= cfg.max_num_seqs
        assert len(sched.running) <= cfg.max_num_seqs
        both = set(so.num_scheduled_tokens) & so.preempted_req_ids
        assert not both, f"requests both scheduled and preempted in one step: {both}"
        for req_id, n in so.num_scheduled_tokens.items():
            req = sched.requests[req_id]
            assert req in sched.running
            assert req.num_computed_tokens + n <= req.num_tokens

    def run(self, max_steps: int = 2000) -> dict[str, list[int]]:
        """Step until no request is left; return each finished request's output token ids."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                break
            self.step()
        else:
            raise AssertionError(f"scheduler did not finish within {max_steps} steps")
        return self.finish()

    def finish(self) -> dict[str, list[int]]:
        """Check nothing leaked, then forget the finished requests; return their outputs."""
        sched = self.scheduler
        kv = sched.kv_cache_manager
        assert not sched.has_unfinished_requests() and sched.get_num_unfinished_requests() == 0
        assert not sched.waiting and not sched.running and not sched.fork_waiters
        cpu = sched.cpu_block_pool
        assert not cpu.req_to_blocks and cpu.get_num_free_blocks() == cpu.num_blocks
        assert kv.block_pool.get_num_free_blocks() == kv.num_blocks
        assert len(kv.block_pool.free_block_queue.block_ids()) == kv.num_blocks
        assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
        assert not kv.req_to_blocks and not kv.num_cached_blocks and not kv.req_to_block_hashes
        outputs = {}
        for req_id, req in list(sched.requests.items()):
            assert req.is_finished()
            outputs[req_id] = list(req.output_token_ids)
            sched.free_finished(req_id)
        assert not sched.requests
        return outputs


def check_block_accounting(sched: Scheduler) -> None:
    """Every block is either free (ref 0, in the free queue) or held by exactly ref_cnt request slots."""
    kv = sched.kv_cache_manager
    pool = kv.block_pool
    held: dict[int, int] = {}
    for blocks in kv.req_to_blocks.values():
        for b in blocks:
            held[b.block_id] = held.get(b.block_id, 0) + 1
    free_ids = pool.free_block_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
    for b in pool.blocks:
        assert b.ref_cnt == held.get(b.block_id, 0), f"block {b.block_id} ref {b.ref_cnt} held {held.get(b.block_id)}"
        assert (b.ref_cnt == 0) == (b.block_id in free_ids)
    for h, b in pool.cached_blocks.items():
        assert b.block_hash == h
    # Only running requests hold blocks, and forked ones waiting to run from the KV they were given;
    # only swapped ones hold CPU blocks, and a request waits with computed tokens only if it is either.
    holders = {r.request_id for r in sched.running}
    holders |= {r.request_id for r in sched.waiting if r.status == RequestStatus.FORKED}
    assert {rid for rid, blocks in kv.req_to_blocks.items() if blocks} <= holders
    swapped = {r.request_id for r in sched.waiting if r.status == RequestStatus.SWAPPED}
    assert set(sched.cpu_block_pool.req_to_blocks) == swapped
    assert all(r.num_computed_tokens == 0 for r in sched.waiting
               if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED))

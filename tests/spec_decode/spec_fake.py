"""A fake runner that verifies drafts, for scheduler tests of speculative decoding (no torch).

It extends tests/core's FakeRunner (simulated paged KV written and read back through
the block table) with what a speculating runner does: the scheduled drafts are
extra query tokens written after the request's last token; verification accepts
drafts while each equals the fake model's next token (``(last + 1) % VOCAB``),
then emits one more token, so a step yields ``accepted + 1`` tokens. The runner's
own computed count rolls back past the rejected positions, as the scheduler's
must. After each step it proposes the next drafts: the model's chain, corrupted at
a random position with probability ``p_wrong`` (so runs of every length occur).
"""

from __future__ import annotations

import random

from pagedllm.core.outputs import ModelRunnerOutput, SchedulerOutput
from tests.core.fake_runner import VOCAB, Driver, FakeRunner, next_token


class SpecFakeRunner(FakeRunner):
    def __init__(self, block_size: int, scheduler, k: int, p_wrong: float, seed: int = 0) -> None:
        super().__init__(block_size, scheduler)
        self.k, self.p_wrong = k, p_wrong
        self.rng = random.Random(seed)

    def propose(self, tokens: list[int]) -> list[int]:
        drafts, last = [], tokens[-1]
        for _ in range(self.k):
            last = next_token(last)
            if self.rng.random() < self.p_wrong:
                last = (last + 7) % VOCAB  # a wrong guess; later drafts follow it
            drafts.append(last)
        return drafts

    def _apply_diff(self, so: SchedulerOutput) -> None:
        for cached in so.scheduled_cached_reqs:  # lookahead blocks the scheduler gave back
            if cached.num_kept_blocks >= 0 and not cached.resumed_from_preemption:
                del self.reqs[cached.req_id].block_ids[cached.num_kept_blocks:]
        super()._apply_diff(so)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_diff(so)
        for src, dst in so.blocks_to_copy:
            self.kv[dst] = dict(self.kv.get(src, {}))
        for gpu, cpu in so.blocks_to_swap_out:
            self.cpu_kv[cpu] = dict(self.kv.get(gpu, {}))
        for cpu, gpu in so.blocks_to_swap_in:
            self.kv[gpu] = dict(self.cpu_kv[cpu])
        written: dict[int, str] = {}
        spec = so.scheduled_spec_decode_tokens
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(req_id), (
                f"runner's block table for {req_id} differs from the KV cache manager's")
            tokens = state.token_ids + spec.get(req_id, [])
            assert state.num_computed_tokens + n <= len(tokens), f"{req_id} scheduled past its drafts"
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + n):
                block, off = self._slot(state, pos)
                assert written.setdefault(block, req_id) == req_id, f"block {block} written by two requests"
                self.kv.setdefault(block, {})[off] = tokens[pos]
        req_ids, sampled, proposals = [], [], {}
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            drafts = spec.get(req_id, [])
            end = state.num_computed_tokens + n - len(drafts)
            for pos in range(end):  # attend over the known tokens (drafts are checked below)
                block, off = self._slot(state, pos)
                assert self.kv.get(block, {}).get(off) == state.token_ids[pos], (
                    f"{req_id} reads a wrong token at position {pos} (block {block})")
            req_ids.append(req_id)
            if end < len(state.token_ids):
                state.num_computed_tokens = end
                sampled.append([])
                continue
            new = []
            for d in drafts:
                if d != next_token((state.token_ids + new)[-1]):
                    break
                new.append(d)
            new.append(next_token((state.token_ids + new)[-1]))
            state.num_computed_tokens = end + len(new) - 1
            state.token_ids.extend(new)
            sampled.append(new)
            proposals[req_id] = self.propose(state.token_ids)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, spec_token_ids=proposals)


class SpecDriver(Driver):
    """Driver over a SpecFakeRunner; the schedule check allows drafts, on decodes only."""

    def __init__(self, scheduler, k: int = 4, p_wrong: float = 0.3, seed: int = 0) -> None:
        super().__init__(scheduler)
        self.runner = SpecFakeRunner(scheduler.block_size, scheduler, k, p_wrong, seed)

    def _check_schedule(self, so: SchedulerOutput) -> None:
        sched, cfg = self.scheduler, self.scheduler.config
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        for req_id, n in so.num_scheduled_tokens.items():
            req = sched.requests[req_id]
            drafts = so.scheduled_spec_decode_tokens.get(req_id, [])
            assert req.num_computed_tokens + n == req.num_tokens + len(drafts) or (
                not drafts and req.num_computed_tokens + n <= req.num_tokens)
            if drafts:
                assert req.num_tokens - req.num_computed_tokens == 1, "drafts on a request that is not decoding"
                assert req.num_output_tokens + len(drafts) + 1 <= req.max_tokens
                assert req.num_tokens + len(drafts) <= cfg.max_model_len

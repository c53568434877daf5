"""The persistent input batch: rows follow the scheduler's diffs, and each step is numpy indexing.

Pure host logic on the CPU: add, remove and condense rows; block table appends; a
preempted request leaving its row and coming back when resumed; sampled tokens
landing in their rows; the per-row sampling state following its row; and the
named staging buffers' layout.
"""

import numpy as np
import pytest
import torch

from pagedllm.core.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import InputBatch, flat_logits_indices
from pagedllm.worker.input_buffers import StagingBuffers

BS = 4
CPU = torch.device("cpu")


def _new(req_id: str, prompt: list[int], blocks: list[int], **params) -> NewRequestData:
    return NewRequestData(req_id, prompt, SamplingParams(**params), blocks, 0)


def _sched(new=(), cached=(), scheduled=None, finished=(), preempted=()) -> SchedulerOutput:
    scheduled = scheduled or {}
    return SchedulerOutput(list(new), list(cached), scheduled, sum(scheduled.values()), set(finished),
                           set(preempted))


def _rows(batch: InputBatch) -> dict[str, int]:
    return dict(batch.req_id_to_row)


def test_add_remove_and_condense_keep_rows_dense() -> None:
    batch = InputBatch(capacity=4, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", [1, 2], [5]), _new("b", [3], [6], temperature=0.5, top_k=3),
                                     _new("c", [4, 4, 4], [7, 8], seed=11)]))
    assert _rows(batch) == {"a": 0, "b": 1, "c": 2}
    batch.update_states(_sched(finished=["a"]))
    # "c" moved into row 0 with its tokens, blocks and sampling state (its generator too).
    assert _rows(batch) == {"c": 0, "b": 1} and batch.req_ids[2] is None
    assert batch.token_ids[0, :3].tolist() == [4, 4, 4] and batch.num_tokens[0] == 3
    assert batch.block_table[0, :batch.num_blocks[0]].tolist() == [7, 8]
    assert batch.sampling.params[0].seed == 11 and set(batch.sampling.generators) == {0}
    assert batch.sampling.temperature[1] == 0.5 and batch.sampling.top_k[1] == 3
    # A new request takes the first free row, right after the occupied ones.
    batch.update_states(_sched(new=[_new("d", [9], [1])], finished=["b"]))
    assert _rows(batch) == {"c": 0, "d": 1}
    assert batch.token_ids[1, 0] == 9 and batch.num_blocks[1] == 1
    step = batch.prepare({"d": 1, "c": 3}, BS)
    assert step.rows.tolist() == [1, 0]  # the scheduler's order, not the rows'
    assert step.input_ids.tolist() == [9, 4, 4, 4]


def test_rows_grow_past_capacity() -> None:
    batch = InputBatch(capacity=2, max_model_len=16, max_num_blocks=4, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new(str(i), [i + 1] * 3, [i], top_p=0.5) for i in range(5)]))
    assert batch.num_reqs == 5 and len(batch.req_ids) >= 5
    step = batch.prepare({str(i): 3 for i in range(5)}, BS)
    assert step.input_ids.tolist() == [t for i in range(5) for t in [i + 1] * 3]
    assert batch.sampling.top_p[:5].tolist() == [0.5] * 5


def test_block_table_appends_and_slot_mapping() -> None:
    batch = InputBatch(capacity=2, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", list(range(1, 7)), [3, 8])], scheduled={"a": 6}))
    step = batch.prepare({"a": 6}, BS)
    assert step.slot_mapping.tolist() == [12, 13, 14, 15, 32, 33]
    assert step.num_sampled_tokens.tolist() == [1] and step.logits_indices.tolist() == [5]
    batch.append_sampled(step, np.array([50]))
    batch.update_states(_sched(cached=[CachedRequestData("a", False, [], 6)], scheduled={"a": 1}))
    batch.append_sampled(batch.prepare({"a": 1}, BS), np.array([51]))
    batch.update_states(_sched(cached=[CachedRequestData("a", False, [2], 7)], scheduled={"a": 1}))
    step = batch.prepare({"a": 1}, BS)
    assert step.input_ids.tolist() == [51] and step.positions.tolist() == [7]
    assert step.block_tables.tolist() == [[3, 8, 2]]
    assert step.slot_mapping.tolist() == [8 * BS + 3]
    assert step.seq_lens.tolist() == [8]


def test_chunked_prefill_samples_only_at_the_end() -> None:
    batch = InputBatch(capacity=2, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", list(range(10)), [0, 1, 2]), _new("b", [7], [5])]))
    step = batch.prepare({"a": 4, "b": 1}, BS)
    assert step.num_sampled_tokens.tolist() == [0, 1] and step.logits_indices.tolist() == [4]
    assert step.positions.tolist() == [0, 1, 2, 3, 0] and step.max_query_len == 4


def test_a_step_past_the_rows_tokens_is_an_internal_error() -> None:
    """The scheduler and the runner disagree on a request's tokens (the async livelock: a stale row
    under a reused id): computing positions the row has no token for must fail, not read stale ids."""
    batch = InputBatch(capacity=2, max_model_len=16, max_num_blocks=4, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", [1, 2, 3], [0])]))
    with pytest.raises(RuntimeError, match="'a' is scheduled up to position 4 but its runner row holds 3"):
        batch.prepare({"a": 4}, BS)


def test_preempted_request_leaves_its_row_and_resumes_with_its_tokens() -> None:
    batch = InputBatch(capacity=4, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", [1, 2, 3], [4], seed=5), _new("b", [6], [7])]))
    step = batch.prepare({"a": 3, "b": 1}, BS)
    batch.append_sampled(step, np.array([40, 41]))
    gen = batch.sampling.generators[0]
    batch.update_states(_sched(cached=[CachedRequestData("b", False, [], 1)], scheduled={"b": 1}, preempted=["a"]))
    assert _rows(batch) == {"b": 0} and "a" in batch.preempted and not batch.sampling.generators
    batch.update_states(_sched(cached=[CachedRequestData("a", True, [9, 2], 0)], scheduled={"a": 4}))
    row = batch.req_id_to_row["a"]
    assert batch.token_ids[row, :4].tolist() == [1, 2, 3, 40] and batch.num_prompt_tokens[row] == 3
    assert batch.sampling.generators[row] is gen  # the seeded stream goes on where it was
    step = batch.prepare({"a": 4}, BS)
    assert step.input_ids.tolist() == [1, 2, 3, 40] and step.block_tables.tolist() == [[9, 2]]
    assert step.num_sampled_tokens.tolist() == [1]
    # A finished preempted request is forgotten.
    batch.update_states(_sched(preempted=["a"]))
    batch.update_states(_sched(finished=["a"]))
    assert "a" not in batch.preempted and _rows(batch) == {"b": 0}


def test_resumed_request_that_kept_its_row_gets_the_whole_table() -> None:
    batch = InputBatch(capacity=2, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", [1, 2, 3, 4, 5], [4, 6])]))
    batch.update_states(_sched(cached=[CachedRequestData("a", True, [1, 3], 4)], scheduled={"a": 1}))
    step = batch.prepare({"a": 1}, BS)
    assert step.block_tables.tolist() == [[1, 3]] and step.slot_mapping.tolist() == [3 * BS]


def test_sampling_metadata_follows_rows() -> None:
    batch = InputBatch(capacity=4, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("g", [1], [0], temperature=0), _new("p", [2, 2], [1], top_k=5,
                                     repetition_penalty=1.5, logprobs=2),
                                     _new("m", [3], [2], min_tokens=2, stop_token_ids=[7])]))
    step = batch.prepare({"m": 1, "p": 2, "g": 1}, BS)
    md = batch.sampling_metadata(step)
    assert md.temperature.tolist() == [1.0, 1.0, 0.0] and not md.all_greedy and not md.all_random
    assert md.top_k.tolist() == [100, 5, 100] and md.max_num_logprobs == 2
    assert md.repetition_penalties.tolist() == [1.0, 1.5, 1.0]
    assert md.prompt_token_ids.tolist() == [[3, 100], [2, 2], [1, 100]]
    assert md.output_token_ids.shape == (3, 0)
    assert [t.tolist() for t in md.min_tokens_mask] == [[0], [7]]
    batch.append_sampled(step, np.array([8, 9, 10]))
    batch.update_states(_sched(cached=[CachedRequestData("p", False, [], 2), CachedRequestData("m", False, [], 1)],
                               scheduled={"p": 1, "m": 1}, finished=["g"]))
    step = batch.prepare({"p": 1, "m": 1}, BS)
    md = batch.sampling_metadata(step)
    assert md.output_token_ids.tolist() == [[9], [8]] and md.temperature.tolist() == [1.0, 1.0]


def test_several_sampled_tokens_per_request() -> None:
    qsl = np.array([0, 3, 4, 9], dtype=np.int32)
    assert flat_logits_indices(qsl, np.array([2, 0, 3])).tolist() == [1, 2, 6, 7, 8]
    assert flat_logits_indices(qsl, np.array([1, 0, 1])).tolist() == [2, 8]
    batch = InputBatch(capacity=2, max_model_len=32, max_num_blocks=8, vocab_size=100, device=CPU)
    batch.update_states(_sched(new=[_new("a", [1, 2], [0]), _new("b", [3], [1])]))
    step = batch.prepare({"a": 2, "b": 1}, BS)
    step.num_sampled_tokens, step.one_sample_each = np.array([2, 1]), False
    batch.append_sampled(step, np.array([20, 21, 30]))
    assert batch.token_ids[0, :4].tolist() == [1, 2, 20, 21] and batch.token_ids[1, :2].tolist() == [3, 30]
    assert batch.num_tokens[:2].tolist() == [4, 2]


def test_staging_buffers_lay_out_named_fields() -> None:
    staging = StagingBuffers([("a", torch.int64, 5), ("b", torch.int32, 3), ("c", torch.int64, 2)], CPU)
    staging.host("a")[:] = 1
    staging.host("c")[:] = [7, 8]
    staging.host("b")[:] = 4
    # On the CPU the device views are the staging itself; fields never overlap.
    assert staging.device("a").tolist() == [1] * 5 and staging.device("c").tolist() == [7, 8]
    assert staging.device("b").dtype == torch.int32 and staging.device("b").tolist() == [4, 4, 4]
    assert staging.device("c").data_ptr() - staging.device("a").data_ptr() == 16 * 8  # 16-element aligned
    staging.copy_to_device(("c", 2), ("b", 3))  # a no-op here


def test_settings_no_row_uses_are_skipped_and_counted_through_condense() -> None:
    """``SamplingState.num_on`` counts the occupied rows using each setting, through add, removal
    and condensing; a step builds only the tensors some sampling row needs."""
    from pagedllm.worker.sampling_metadata import SamplingState

    state = SamplingState(4, vocab_size=100)
    state.add(0, SamplingParams(temperature=0))
    state.add(1, SamplingParams(temperature=0.8, top_p=0.5, presence_penalty=0.5, logprobs=2))
    state.add(2, SamplingParams(temperature=0, top_k=5, min_tokens=3, stop_token_ids=[7]))
    assert state.num_on["temperature"] == 1 and state.num_on["top_p"] == 1 and state.num_on["top_k"] == 1
    assert state.num_on["presence_penalties"] == 1 and state.num_on["num_logprobs"] == 1
    tokens, prompt_lens, num_tokens = np.zeros((4, 8), np.int32), np.full(4, 2), np.full(4, 4)
    md = state.metadata(np.array([0, 2]), tokens, prompt_lens, num_tokens, torch.device("cpu"))
    # Greedy rows only: no filter (top_k of a greedy row is ignored), no penalty, no logprobs.
    assert md.all_greedy and md.top_k is None and md.top_p is None and md.presence_penalties is None
    assert md.max_num_logprobs is None and md.min_tokens_mask is not None  # row 2 is below min_tokens
    md = state.metadata(np.array([0, 1]), tokens, prompt_lens, num_tokens, torch.device("cpu"))
    assert md.top_p.tolist() == [1.0, 0.5] and md.presence_penalties.tolist() == [0.0, 0.5]
    assert md.max_num_logprobs == 2 and not md.all_greedy and not md.all_random
    state.remove(1)
    state.move(2, 1)
    assert state.num_on["temperature"] == 0 and state.num_on["top_p"] == 0
    assert state.num_on["presence_penalties"] == 0 and state.num_on["top_k"] == 1
    state.add(2, SamplingParams(temperature=1.0))  # the row left by the move starts clean
    assert state.num_on["temperature"] == 1 and state.num_on["top_k"] == 1
    assert state.top_k[1] == 5 and state.min_tokens[1] == 3  # moved with its request

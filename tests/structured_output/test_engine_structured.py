"""Constrained decoding in the engine (offline LLM, real default model): preemption, mixed batches, cleanup."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 14 blocks of 16 tokens cannot hold 6 requests of ~50 tokens: requests are preempted and recomputed.
    # fp32: the batch-invariance check below holds in fp32; on the CPU fast path a decode step of at most 8
    # sequences multiplies by int4 weights and a bigger one by bf16 (docs/CPU.md, "Batch invariance").
    return LLM(device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks_override=14, block_size=16,
               max_num_seqs=6)


def _assert_clean(llm: LLM) -> None:
    assert llm.engine.structured_output.num_tracked == 0
    assert not llm.engine.scheduler.requests and not llm.engine.has_unfinished_requests()


def test_preemption_mixed_batch_and_batch_invariance(llm: LLM) -> None:
    prompts = [f"Person number {i} described as JSON, with a name, an age and tags:" for i in range(6)]
    constrained = SamplingParams(temperature=0, max_tokens=48,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    free = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    params = [constrained if i % 2 == 0 else free for i in range(6)]
    before = llm.engine.scheduler.num_preemptions
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > before, "the small cache should force preemption"
    for i, out in enumerate(outs):
        if i % 2 == 0:
            assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
            jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    _assert_clean(llm)
    # The same request alone gives the same tokens: the mask is per row, and preemption kept each matcher's state.
    alone = llm.generate([prompts[0]], params[0], use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[0].outputs[0].token_ids
    _assert_clean(llm)


def test_n_samples_each_follow_the_grammar(llm: LLM) -> None:
    spec = StructuredOutputsParams(regex=r"(yes|no), because [a-z]{2,8}\.")
    out = llm.generate(["Is water wet?"], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24,
                                                        structured_outputs=spec), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for sample in out.outputs:
        assert re.fullmatch(r"(yes|no), because [a-z]{2,8}\.", sample.text), sample.text
    _assert_clean(llm)


def test_bad_grammar_raises_and_engine_keeps_serving(llm: LLM) -> None:
    with pytest.raises(ValueError, match="structured_outputs.json cannot be compiled"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "bogus"})),
                     use_tqdm=False)
    _assert_clean(llm)
    out = llm.generate(["Say"], SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(
        choice=["hello", "bye"])), use_tqdm=False)[0]
    assert out.outputs[0].text in ("hello", "bye")
    _assert_clean(llm)

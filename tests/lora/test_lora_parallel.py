"""Multi-LoRA under tensor and pipeline parallelism (worker processes, gloo, fp32): each rank holds its
part of every adapter (column-parallel layers some rows of B, row-parallel ones some columns of A, adding
their partial delta before the all-reduce); each stage loads only its layers. Greedy tokens of a batch
that mixes three adapters and the base model equal HF transformers + PEFT."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.lora.test_lora_engine import NUM_TOKENS, PROMPTS, _mixed, adapters, reference  # noqa: F401 - fixtures


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_mixed_adapters_match_peft_over_ranks(adapters, reference, tp: int, pp: int):  # noqa: F811
    root, paths = adapters
    llm = LLM(model=str(root / "base"), dtype="float32", device="cpu", skip_tokenizer_init=True, enable_lora=True,
              max_loras=2, max_lora_rank=16, block_size=4, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    cases = _mixed(paths)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[p] for p, _, _ in cases], params, use_tqdm=False,
                        lora_request=[r for _, _, r in cases])
    got = {(p, name): o.outputs[0].token_ids for (p, name, _), o in zip(cases, outs)}
    assert got == {(p, name): reference[name][p] for p, name, _ in cases}
    llm.engine.executor.shutdown()

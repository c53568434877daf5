"""Multi-LoRA through the offline engine on a tiny random Llama: greedy tokens identical to HF
transformers + PEFT for each adapter, in batches that mix adapters and the base model."""

from __future__ import annotations

import json

import pytest
import torch

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.lora.peft_adapters import ALL_TARGETS, peft_greedy, save_adapter
from tests.tiny_llama import tiny_llama

PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 100, 101, 102], [1, 7, 7, 7, 8, 9, 10, 200, 3], [1, 42],
           [1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The base checkpoint and three adapters: different ranks, targets, alpha and rsLoRA."""
    root = tmp_path_factory.mktemp("lora")
    tiny_llama().save_pretrained(root / "base")
    paths = {
        "qv8": save_adapter(tiny_llama(), root / "qv8", 8, ["q_proj", "v_proj"], seed=1),
        "all4rs": save_adapter(tiny_llama(), root / "all4rs", 4, ALL_TARGETS, seed=2, rslora=True),
        "mlp16": save_adapter(tiny_llama(), root / "mlp16", 16, ["gate_proj", "down_proj"], seed=3, alpha=64),
    }
    return root, paths


@pytest.fixture(scope="module")
def reference(adapters):
    """HF + PEFT greedy tokens per adapter (None: the base model)."""
    _, paths = adapters
    return {name: peft_greedy(tiny_llama(), path, PROMPTS, NUM_TOKENS)
            for name, path in [(None, None), *paths.items()]}


def _llm(root, **kwargs) -> LLM:
    args = dict(model=str(root / "base"), dtype="float32", device="cpu", skip_tokenizer_init=True,
                enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4)
    return LLM(**{**args, **kwargs})


def _mixed(paths: dict[str, str]):
    """Every prompt under every adapter and the base model, interleaved: (prompt, adapter name, request)."""
    ids = {name: i + 1 for i, name in enumerate(paths)}
    cases = []
    for p in range(len(PROMPTS)):
        for name in [None, *paths]:
            request = LoRARequest(name, ids[name], paths[name]) if name else None
            cases.append((p, name, request))
    return cases


def test_adapters_change_the_output(reference):
    # Negative control: the comparison below would be vacuous if an adapter left the tokens as they were.
    for name in ("qv8", "all4rs", "mlp16"):
        assert reference[name] != reference[None], name


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_mixed_batch_matches_peft_with_preemption(adapters, reference, preemption):
    root, paths = adapters
    # 20 sequences, 3 adapters, 2 slots, 14 blocks of 4 tokens: preemption and adapters that must wait.
    llm = _llm(root, num_gpu_blocks_override=14, max_num_seqs=8, preemption_mode=preemption)
    cases = _mixed(paths)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[p] for p, _, _ in cases], params, use_tqdm=False,
                        lora_request=[r for _, _, r in cases])
    got = {(p, name): o.outputs[0].token_ids for (p, name, _), o in zip(cases, outs)}
    want = {(p, name): reference[name][p] for p, name, _ in cases}
    assert got == want
    assert llm.engine.scheduler.num_preemptions > 0  # the case this test is for


def test_async_scheduling_with_adapters_matches_peft(adapters, reference):
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=64, async_scheduling=True, max_loras=3)
    cases = _mixed(paths)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[p] for p, _, _ in cases], params, use_tqdm=False,
                        lora_request=[r for _, _, r in cases])
    assert [o.outputs[0].token_ids for o in outs] == [reference[name][p] for p, name, _ in cases]


def test_scheduler_never_runs_more_adapters_than_slots(adapters):
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=64, max_loras=2)
    engine = llm.engine
    for i, (p, _, request) in enumerate(_mixed(paths)):
        engine.add_request(str(i), PROMPTS[p], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                           lora_request=request)
    seen = set()
    while engine.has_unfinished_requests():
        running = {r.lora_int_id for r in engine.scheduler.running} - {0}
        assert len(running) <= 2
        seen |= running
        engine.step()
    assert seen == {1, 2, 3}


def test_adapters_never_share_prefix_cache_blocks(adapters, reference):
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=64)
    prompt = PROMPTS[4]  # 11 tokens: two full blocks of 4 to share
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    first = LoRARequest("qv8", 1, paths["qv8"])
    llm.generate([prompt], params, use_tqdm=False, lora_request=first)
    scheduler = llm.engine.scheduler
    # Same prompt, other adapter (and the base model): no hit; same adapter again: a hit.
    for request, name, hit in [(LoRARequest("mlp16", 2, paths["mlp16"]), "mlp16", False), (None, None, False),
                               (first, "qv8", True)]:
        before = scheduler.kv_cache_manager.stats.hits
        out = llm.generate([prompt], params, use_tqdm=False, lora_request=request)
        assert (scheduler.kv_cache_manager.stats.hits > before) is hit, name
        assert out[0].outputs[0].token_ids == reference[name][4]


def test_adapters_load_while_requests_run(adapters, reference):
    # An adapter first named by a request added mid-run is loaded then; the running requests are unharmed.
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=64, max_loras=1, max_cpu_loras=1)
    engine = llm.engine
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params, lora_request=LoRARequest("qv8", 1, paths["qv8"]))
    engine.step()
    engine.step()
    engine.add_request("b", PROMPTS[1], params, lora_request=LoRARequest("all4rs", 2, paths["all4rs"]))
    engine.add_request("c", PROMPTS[2], params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"a": reference["qv8"][0], "b": reference["all4rs"][1], "c": reference[None][2]}


def test_bad_adapters_are_clear_errors(adapters, tmp_path):
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=16, max_lora_rank=8)
    params = SamplingParams(max_tokens=2)
    cases = [
        (LoRARequest("gone", 1, str(tmp_path / "missing")), "is not a directory"),
        (LoRARequest("big", 2, paths["mlp16"]), "outside 1..max_lora_rank=8"),
    ]
    # An adapter made for another model (wider layers) is refused before it reaches a step.
    other = tmp_path / "other"
    save_adapter(tiny_llama_wide(), other, 4, ["q_proj"], seed=5)
    cases.append((LoRARequest("other", 3, str(other)), "another model"))
    dora = tmp_path / "dora"
    save_adapter(tiny_llama(), dora, 4, ["q_proj"], seed=6)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases.append((LoRARequest("dora", 4, str(dora)), "use_dora"))
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=request)
    # The engine still serves, with and without an adapter.
    good = LoRARequest("qv8", 5, paths["qv8"])
    assert len(llm.generate([PROMPTS[0]], params, use_tqdm=False, lora_request=good)[0].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="not enabled"):
        LLM(model=str(root / "base"), dtype="float32", device="cpu", skip_tokenizer_init=True,
            num_gpu_blocks_override=16).generate([PROMPTS[0]], params, use_tqdm=False, lora_request=good)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, paths["qv8"])
    with pytest.raises(ValueError, match="max_loras"):
        _llm(root, max_loras=0)


def tiny_llama_wide() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_adapters_in_a_worker_process(adapters, reference):
    # --distributed-executor-backend mp: the worker process reads each adapter from its path itself.
    root, paths = adapters
    llm = _llm(root, num_gpu_blocks_override=64, distributed_executor_backend="mp")
    try:
        params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
        outs = llm.generate(PROMPTS[:2], params, use_tqdm=False,
                            lora_request=[LoRARequest("all4rs", 2, paths["all4rs"]), None])
        assert [o.outputs[0].token_ids for o in outs] == [reference["all4rs"][0], reference[None][1]]
    finally:
        llm.shutdown()

"""LoRA on a GPU: the Triton SGMV path, eager and under CUDA graphs, against checkpoints with each
adapter merged into the weights (W + scaling * B @ A), fp32, greedy tokens identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.lora.dummy import write_random_adapter
from tests.tiny_llama import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 100, 101, 102], [1, 7, 7, 7, 8, 9, 10, 200, 3], [1, 42],
           [1, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
ADAPTERS = {"qv": (8, ["q_proj", "v_proj"]), "all": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]), "mlp": (16, ["up_proj"])}


def _merged(base, adapter_dir: str, rank: int) -> torch.nn.Module:
    """``base`` with the adapter folded into its weights (alpha = 2 r: scaling 2)."""
    weights = load_file(f"{adapter_dir}/adapter_model.safetensors")
    params = dict(base.named_parameters())
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            params[name] += 2.0 * (b.float() @ a.float())
    return base


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gpu")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    paths, reference = {}, {}
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        paths[name] = write_random_adapter(str(root / name), base.config, rank, targets, seed=i, b_std=0.1,
                                           dtype=torch.float32)
        _merged(tiny_llama(), paths[name], rank).save_pretrained(root / f"merged_{name}")
    for name in [None, *ADAPTERS]:
        model = root / ("base" if name is None else f"merged_{name}")
        llm = LLM(model=str(model), dtype="float32", device="cuda", skip_tokenizer_init=True, enforce_eager=True,
                  num_gpu_blocks_override=64, gpu_memory_utilization=0.3)
        reference[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        del llm
    return root, paths, reference


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_mixed_adapters_match_merged_weights(setup, enforce_eager):
    root, paths, reference = setup
    for name in ADAPTERS:
        assert reference[name] != reference[None]  # the adapters change the output
    llm = LLM(model=str(root / "base"), dtype="float32", device="cuda", skip_tokenizer_init=True,
              enable_lora=True, max_loras=2, enforce_eager=enforce_eager, num_gpu_blocks_override=20,
              block_size=4, max_num_seqs=7, gpu_memory_utilization=0.3)
    ids = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    cases = [(p, name) for p in range(len(PROMPTS)) for name in [None, *ADAPTERS]]
    requests = [LoRARequest(name, ids[name], paths[name]) if name else None for _, name in cases]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPTS[p] for p, _ in cases], params, use_tqdm=False, lora_request=requests)
    assert [o.outputs[0].token_ids for o in outs] == [reference[name][p] for p, name in cases]
    assert llm.engine.scheduler.num_preemptions > 0

"""Tensor parallelism of the layers: two CPU workers (gloo) must reproduce HF's logits.

Each worker builds the model with ``set_tensor_parallel(rank, 2)``, loads the
full HF checkpoint through the weight loaders (which keep only its shard:
heads of q/k/v (a replica of the one KV head when there are more ranks than
KV heads), halves of gate/up, input halves of o/down, vocabulary rows)
and runs the paged forward over its own KV heads. The vocabulary size is odd,
so the last worker's vocabulary slice is padded.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pagedllm.attention.backend import get_backend
from pagedllm.models.layers.parallel import set_tensor_parallel
from pagedllm.models.llama import LlamaForCausalLM
from tests.models.paged_driver import PagedDriver

WORLD_SIZE = 2
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [53, 58, 97 - 1, 0, 7]]


def _worker(rank: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        set_tensor_parallel(rank, WORLD_SIZE)
        for name, (config, state_dict) in torch.load(os.path.join(directory, "checkpoints.pt"),
                                                     weights_only=False).items():
            model = LlamaForCausalLM(config, get_backend("torch"))
            model.load_weights(state_dict.items())
            driver = PagedDriver(model, config, block_size=4, num_blocks=16, tp_size=WORLD_SIZE)
            logits = driver.step(list(enumerate(PROMPTS)))
            torch.save(logits, os.path.join(directory, f"{name}-logits{rank}.pt"))
    finally:
        set_tensor_parallel(0, 1)
        dist.destroy_process_group()


CONFIGS = {
    "llama-biases-untied": LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2-tied": Qwen2Config(**COMMON, tie_word_embeddings=True),
    # One KV head, two ranks: each rank holds a replica of it.
    "llama-mqa-replicated-kv": LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=False),
}


def test_two_workers_match_hf(tmp_path):
    # One spawn for all configs: starting the workers is most of the cost.
    hf_models = {name: random_model(config) for name, config in CONFIGS.items()}
    torch.save({name: (m.config, m.state_dict()) for name, m in hf_models.items()}, tmp_path / "checkpoints.pt")
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, start_method="spawn")
    for name, hf_model in hf_models.items():
        for rank in range(WORLD_SIZE):
            outs = torch.load(tmp_path / f"{name}-logits{rank}.pt")
            for ids, ours in zip(PROMPTS, outs, strict=True):
                with torch.no_grad():
                    ref = hf_model(torch.tensor([ids])).logits[0]
                assert ours.shape == ref.shape
                assert (ours - ref).abs().max().item() <= 1e-3 * (ref.max() - ref.min()).item(), (name, rank)


def random_model(config):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return hf_model

"""On a CUDA GPU: tiny checkpoints built on the device in fp32 and bf16, and dummy weights, vs HF."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from pagedllm.attention.backend import get_backend
from pagedllm.config import ModelConfig
from pagedllm.loader import load_model
from tests.models.paged_driver import PagedDriver

pytestmark = pytest.mark.gpu

COMMON = dict(vocab_size=211, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
PROMPTS = [list(range(3, 40)), [5, 6, 7], [100, 200, 150, 9, 8, 7, 6]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON) if request.param == "llama" else Qwen3Config(**COMMON, head_dim=64)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return hf_model.cuda(), str(directory)


@pytest.mark.parametrize("dtype, rel_tol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_cuda_logits_match_hf(checkpoint, dtype, rel_tol):
    hf_model, directory = checkpoint
    model_config = ModelConfig(model=directory, dtype=dtype)
    model = load_model(model_config, torch.device("cuda"), get_backend("torch"))
    assert all(p.is_cuda and p.dtype == model_config.torch_dtype for p in model.parameters())
    driver = PagedDriver(model, model_config.hf_config, 16, 32, dtype=model_config.torch_dtype, device="cuda")
    outs = driver.step(list(enumerate(PROMPTS)), num_padding=4)
    for ids, ours in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids], device="cuda")).logits[0]
        assert (ours - ref).abs().max().item() <= rel_tol * (ref.max() - ref.min()).item()


def test_auto_dtype_on_cuda_follows_the_checkpoint(checkpoint):
    _, directory = checkpoint
    model_config = ModelConfig(model=directory, dtype="auto")
    load_model(model_config, torch.device("cuda"), get_backend("torch"))
    assert model_config.torch_dtype == torch.float32  # save_pretrained of an fp32 model records float32


def test_dummy_weights_on_cuda(checkpoint):
    _, directory = checkpoint
    model_config = ModelConfig(model=directory, load_format="dummy", dtype="bfloat16")
    model = load_model(model_config, torch.device("cuda"), get_backend("torch"))
    assert all(p.is_cuda for p in model.parameters())
    driver = PagedDriver(model, model_config.hf_config, 16, 32, dtype=torch.bfloat16, device="cuda")
    assert torch.isfinite(driver.step([(0, PROMPTS[0])])[0]).all()

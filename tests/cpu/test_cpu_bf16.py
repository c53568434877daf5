"""cpu_bf16: bf16 weight storage with fp32 activations, and its selection as the CPU default."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.config import EngineArgs
from pagedllm.models.layers.embedding import LMHead, VocabEmbedding
from pagedllm.models.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedllm.quantization import get_quantization_config
from pagedllm.quantization.cpu_bf16 import CpuBf16Config, CpuBf16LinearMethod


def test_linear_stores_bf16_and_both_paths_match_the_rounded_weight():
    torch.manual_seed(0)
    layer = RowParallelLinear(64, 32, bias=True, quant_config=CpuBf16Config(gemv_rows=4))
    layer.quant_method.gemv_rows = 4  # the widened path too on a CPU with native bf16 (where the config skips it)
    w, b = torch.randn(32, 64), torch.randn(32)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    w_rounded = w.bfloat16().float()
    for rows in (1, 4, 5, 40):  # <= gemv_rows: bf16 GEMV; above: the weight widened to fp32
        x = torch.randn(rows, 64)
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 32)
        ref = F.linear(x, w_rounded, b)
        torch.testing.assert_close(y, ref, atol=0.1, rtol=0.02)  # bf16-rounded input on the GEMV path
    x = torch.randn(40, 64)  # the wide path: rounded input times rounded weight, output rounded like bf16's
    torch.testing.assert_close(layer(x), F.linear(x.bfloat16().float(), w_rounded).bfloat16().float() + b)
    # Batch invariance: a row gives (nearly) the same result alone (GEMV) as inside a wide batch.
    assert torch.equal(layer(x[:1]), layer(x)[:1])  # bit for bit here (oneDNN accumulates bf16 in fp32)


def test_fused_qkv_shards_land_in_their_spans():
    layer = QKVParallelLinear(16, 4, num_heads=4, num_kv_heads=2, quant_config=CpuBf16Config())
    parts = {"q": torch.randn(16, 16), "k": torch.randn(8, 16), "v": torch.randn(8, 16)}
    for shard, t in parts.items():
        layer.weight.weight_loader(layer.weight, t, shard)
    assert torch.equal(layer.weight.float(), torch.cat(list(parts.values())).bfloat16().float())


def test_tied_embedding_and_lm_head_share_one_bf16_matrix():
    method = CpuBf16LinearMethod(gemv_rows=16)
    embed = VocabEmbedding(100, 8, quant_method=method)
    head = LMHead(100, 8, tied_to=embed)
    full = torch.randn(100, 8)
    embed.weight.weight_loader(embed.weight, full)
    assert head.weight is embed.weight and embed.weight.dtype == torch.bfloat16
    ids = torch.tensor([3, 99])
    assert embed(ids).dtype == torch.float32
    torch.testing.assert_close(embed(ids), full[ids].bfloat16().float())
    hidden = torch.randn(2, 8)
    torch.testing.assert_close(head(hidden), hidden @ full.bfloat16().float().T, atol=0.05, rtol=0.02)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"device": "cpu"}, "cpu_bf16"),
    ({"device": "cpu", "dtype": "float32"}, None),
    ({"device": "cpu", "dtype": "bfloat16"}, None),
    ({"device": "cuda"}, None),
    ({"device": "cpu", "quantization": "cpu_bf16", "dtype": "float32"}, "cpu_bf16"),
])
def test_cpu_default_is_the_fast_path_unless_precision_is_asked_for(kwargs, expected):
    assert EngineArgs(**kwargs).model_config().quantization == expected


def test_registered_and_configurable():
    config = get_quantization_config("cpu_bf16", {"gemv_rows": 3})
    assert isinstance(config, CpuBf16Config)
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        EngineArgs(quantization="int3")

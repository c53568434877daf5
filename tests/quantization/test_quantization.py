"""The quantization seam: linear layers delegate storage, loading and the matmul to their method.

A fake method that stores the weight transposed stands in for a real quantized
format: layers built with it must load the same checkpoint tensors and compute
the same outputs as the dense (UnquantizedLinearMethod) layers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import quantization
from pagedllm.config import EngineArgs
from pagedllm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.quantization.base import (
    QuantizationConfig,
    QuantizationMethod,
    UnquantizedLinearMethod,
    WeightLoader,
    copy_weight,
)


class TransposedMethod(QuantizationMethod):
    """Keeps ``weight_t`` as (input_size, output_size): a layout of its own, as a packed format has."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        layer.weight_t = nn.Parameter(torch.empty(input_size, output_size), requires_grad=False)
        layer.weight_t.weight_loader = weight_loader
        layer.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def weight_loader(self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
                      output_span: tuple[int, int] | None = None) -> None:
        if param.dim() == 2:
            dst = param.data if output_span is None else param.data.narrow(1, *output_span)
            copy_weight(dst, loaded_weight.t())
        else:
            copy_weight(param.data if output_span is None else param.data.narrow(0, *output_span), loaded_weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ layer.weight_t
        return y if bias is None else y + bias


class TransposedConfig(QuantizationConfig):
    name = "transposed"

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip

    @classmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> TransposedConfig:
        return cls(skip=hf_quant_config.get("skip", 0))

    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        return TransposedMethod()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantization.QUANTIZATION_METHODS, "transposed", f"{__name__}:TransposedConfig")


def test_dense_is_the_default_method() -> None:
    layer = RowParallelLinear(6, 4, bias=True)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    w, b = torch.randn(4, 6), torch.randn(4)
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, b)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


def test_registry_imports_the_config_lazily(registered: None) -> None:
    config = quantization.get_quantization_config("transposed", {"skip": 2})
    assert isinstance(config, TransposedConfig) and config.skip == 2
    assert quantization.get_quantization_config(None) is None


def test_fused_layers_load_shards_through_the_method(registered: None) -> None:
    config = quantization.get_quantization_config("transposed")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * 4, 8, generator=gen) for n in (4, 2, 2))
    gate, up = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    x = torch.randn(3, 8, generator=gen)
    for quant_config in (None, config):
        qkv = QKVParallelLinear(8, 4, 4, 2, quant_config=quant_config)
        gate_up = MergedColumnParallelLinear(8, [5, 5], quant_config=quant_config)
        for layer, shards in ((qkv, {"q": q, "k": k, "v": v}), (gate_up, {0: gate, 1: up})):
            param = next(layer.parameters())
            for shard_id, tensor in shards.items():
                param.weight_loader(param, tensor, shard_id)
        torch.testing.assert_close(qkv(x), x @ torch.cat([q, k, v]).t())
        torch.testing.assert_close(gate_up(x), x @ torch.cat([gate, up]).t())
    assert isinstance(qkv.quant_method, TransposedMethod) and qkv.weight_t.shape == (8, 32)


def test_unknown_method_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="quantization: unknown method 'squeezellm'"):
        quantization.get_quantization_config("squeezellm")
    with pytest.raises(ValueError, match="quantization: unknown method 'squeezellm'"):
        EngineArgs(quantization="squeezellm")
    assert EngineArgs(dtype="float32").model_config().quantization is None  # auto on CPU: cpu_bf16

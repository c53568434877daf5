"""The quantization interfaces: a config per model, a method per linear layer.

    QuantizationConfig   one per model, from ``ModelConfig.quantization`` and the
                         checkpoint's ``quantization_config``; hands each linear
                         layer its method (``get_linear_method``)
    QuantizationMethod   creates the layer's parameters, fills them from
                         checkpoint tensors, and computes ``y = x W^T + b``

The linear layer keeps what depends on parallelism (which slice of a checkpoint
tensor this worker owns, where a fused shard goes); the method owns how that
slice is stored and multiplied. ``UnquantizedLinearMethod`` is the dense one.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.loader.gguf_dequant import INT4_CODES

# The layer's loader set on each parameter: (param, checkpoint tensor, shard id or None).
WeightLoader = Callable[..., None]


@dataclass(frozen=True)
class StepShape:
    """The shape of the step a forward computes, for a method that picks its kernel per step rather than per
    matmul size: every token of a step then goes through the same weights, whatever the step's row count."""

    num_seqs: int
    decoding: bool  # every sequence's new tokens are past its prompt (decodes, speculative verification)


_STEP_SHAPE: ContextVar[StepShape | None] = ContextVar("pagedllm_step_shape", default=None)


@contextlib.contextmanager
def step_shape(num_seqs: int, decoding: bool) -> Iterator[None]:
    """The model runner's forward of one step runs inside this (``current_step_shape`` reads it)."""
    token = _STEP_SHAPE.set(StepShape(num_seqs, decoding))
    try:
        yield
    finally:
        _STEP_SHAPE.reset(token)


def current_step_shape() -> StepShape | None:
    """The shape of the step being computed; None outside a model runner's step (a layer called directly)."""
    return _STEP_SHAPE.get()


def carry_int4_codes(whole: torch.Tensor, part: torch.Tensor, out_span: tuple[int, int] | None,
                     in_span: tuple[int, int] | None) -> torch.Tensor:
    """``part`` (a slice of ``whole``) with the same slice of the GGUF codes ``whole`` carries, if it does
    (``gguf_dequant.INT4_CODES``); a slice of the inputs that splits a group of 32 goes without them."""
    codes = getattr(whole, INT4_CODES, None)
    if codes is None or part is whole:
        return part
    if out_span is not None:
        codes = tuple(t.narrow(0, *out_span) for t in codes)
    if in_span is not None:
        if in_span[0] % 32 or in_span[1] % 32:
            return part
        groups = (in_span[0] // 32, in_span[1] // 32)
        codes = (codes[0].narrow(1, *in_span), codes[1].narrow(1, *groups), codes[2].narrow(1, *groups))
    setattr(part, INT4_CODES, codes)
    return part


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint tensor into (a view of) a parameter, refusing silent broadcasting."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(src)


def register_bias(layer: nn.Module, output_size: int, bias: bool, weight_loader: WeightLoader) -> None:
    """The layer's ``bias`` in the model dtype (every method keeps it dense), or None."""
    if bias:
        layer.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        layer.bias.weight_loader = weight_loader
    else:
        layer.register_parameter("bias", None)


class QuantizationMethod(ABC):
    """How one linear layer stores, loads and applies its weight."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        """Register the layer's parameters (this worker's ``output_size x input_size``), each
        carrying ``weight_loader``; a layer without bias registers ``bias`` as None."""

    @abstractmethod
    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        """Store ``loaded_weight`` (this worker's slice of a checkpoint tensor) in ``param``;
        ``output_span`` (offset, size) along the output dim for one shard of a fused layer."""

    def shard(self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
              out_span: tuple[int, int] | None = None, in_span: tuple[int, int] | None = None) -> torch.Tensor:
        """This tensor-parallel rank's part of a checkpoint tensor: outputs ``out_span`` (start, size) or
        inputs ``in_span``, counted in the float weight's elements, cut from the tensor in its own layout.
        Here: (output, input) matrices, and tensors along the outputs only (biases, per-channel scales of
        shape (N,) or (N, 1)); a per-tensor scale (one element) is every rank's."""
        if loaded_weight.numel() == 1:
            return loaded_weight
        whole = loaded_weight
        if out_span is not None:
            loaded_weight = loaded_weight.narrow(0, *out_span)
        full_input = layer.input_size * layer.tp_size
        if in_span is not None and loaded_weight.dim() >= 2 and loaded_weight.shape[1] == full_input:
            loaded_weight = loaded_weight.narrow(1, *in_span)
        else:
            in_span = None
        return carry_int4_codes(whole, loaded_weight, out_span, in_span)

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` (..., input_size) -> (..., output_size)."""


class QuantizationConfig(ABC):
    """A quantization format: reads its settings and gives each linear layer its method."""

    name: str = "abstract"
    # The GGUF loader attaches 4-bit matrices' codes to the float tensors it yields (gguf_dequant.INT4_CODES).
    needs_int4_codes: bool = False

    @classmethod
    @abstractmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> QuantizationConfig:
        """Build from the checkpoint's ``quantization_config`` dict (empty when it has none)."""

    @abstractmethod
    def get_linear_method(self, layer: nn.Module) -> QuantizationMethod:
        """The method for ``layer``; ``UnquantizedLinearMethod()`` for layers kept dense."""

    def get_embedding_method(self) -> QuantizationMethod | None:
        """The method for the token embedding / LM head matrix; None keeps it dense in the model dtype."""
        return None


class UnquantizedLinearMethod(QuantizationMethod):
    """Dense weights stored as HF stores them, ``(output_size, input_size)``, in the model dtype."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, bias: bool, weight_loader: WeightLoader
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        layer.weight.weight_loader = weight_loader
        register_bias(layer, output_size, bias, weight_loader)

    def weight_loader(
        self, layer: nn.Module, param: nn.Parameter, loaded_weight: torch.Tensor,
        output_span: tuple[int, int] | None = None,
    ) -> None:
        dst = param.data if output_span is None else param.data.narrow(0, *output_span)
        copy_weight(dst, loaded_weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

"""Linear layers shaped for tensor parallelism, and the weight loaders that fill them.

Weights are stored as HF stores them, ``(output_size, input_size)``. Each
parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)``
that copies this worker's slice of a full checkpoint tensor into it, so a
model's ``load_weights`` never needs to know how a parameter is split:

    ColumnParallelLinear         output dim split across workers (no communication)
    ├── MergedColumnParallelLinear   several outputs in one matmul (gate_proj + up_proj)
    └── QKVParallelLinear            q_proj + k_proj + v_proj, split by heads
    RowParallelLinear            input dim split; partial sums all-reduced

With one worker (the default) every split is the identity.

How a layer stores and multiplies its weight is its quantization method's
(``pagedllm.quantization``): the layer works out which slice of a checkpoint
tensor it owns and where a fused shard goes, then hands the slice to
``quant_method.weight_loader``; ``forward`` is ``quant_method.apply``. Without a
quantization config the method is ``UnquantizedLinearMethod`` (dense).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.models.layers.parallel import all_reduce, divide, get_tp_rank, get_tp_size, kv_heads_per_rank
from pagedllm.quantization.base import QuantizationConfig, QuantizationMethod, UnquantizedLinearMethod


class LinearBase(nn.Module):
    """``y = x @ W.T + b``; ``tp_dim`` is the weight dimension split across workers (None: replicated)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_dim: int | None,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.tp_dim = tp_dim
        self.input_size, self.output_size = input_size, output_size  # of this worker
        self.quant_method: QuantizationMethod = (
            quant_config.get_linear_method(self) if quant_config is not None else UnquantizedLinearMethod()
        )
        self.quant_method.create_weights(self, input_size, output_size, bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        # This worker's outputs (column-parallel) or inputs (row-parallel; a bias is every worker's).
        if self.tp_size > 1 and self.tp_dim == 0:
            loaded_weight = self._shard(param, loaded_weight, out_span=self._rank_span(self.output_size))
        elif self.tp_size > 1 and self.tp_dim == 1:
            loaded_weight = self._shard(param, loaded_weight, in_span=self._rank_span(self.input_size))
        self.quant_method.weight_loader(self, param, loaded_weight)

    def _rank_span(self, size: int) -> tuple[int, int]:
        """(start, size) of this worker's ``size`` elements in the whole dimension."""
        return self.tp_rank * size, size

    def _shard(self, param: nn.Parameter, loaded_weight: torch.Tensor, **span: tuple[int, int]) -> torch.Tensor:
        """The quantization method cuts its tensors (their layouts are its own)."""
        if self.tp_size == 1:
            return loaded_weight
        return self.quant_method.shard(self, param, loaded_weight, **span)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every worker holds the whole weight."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant_config: QuantizationConfig | None = None
    ) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=None, quant_config=quant_config)


class ColumnParallelLinear(LinearBase):
    """Each worker computes a slice of the outputs; the result stays split."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant_config: QuantizationConfig | None = None
    ) -> None:
        output_size = divide(output_size, get_tp_size(), "output size")
        super().__init__(input_size, output_size, bias, tp_dim=0, quant_config=quant_config)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears of the same input fused into one matmul (e.g. gate_up_proj).

    ``shard_id`` is the index of the sub-linear a checkpoint tensor belongs to.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant_config)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be an index below {len(self.output_sizes)}, got {shard_id!r}")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        loaded_weight = self._shard(param, loaded_weight, out_span=self._rank_span(size))
        self.quant_method.weight_loader(self, param, loaded_weight, (offset, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one matmul; each worker owns whole heads.

    Output layout per worker: [q (num_heads/tp * head_dim) | k (num_kv_heads/tp * head_dim) | v (same)].
    With more workers than KV heads each worker holds one KV head, shared by ``tp / num_kv_heads`` workers.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp_size)
        self.first_kv_head = get_tp_rank() * num_kv_heads // tp_size  # of the checkpoint's, on this worker
        output_size = (num_heads + 2 * self.num_kv_heads * tp_size) * head_dim
        super().__init__(hidden_size, output_size, bias, quant_config)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        spans = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        if shard_id not in spans:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        offset, size = spans[shard_id]
        if shard_id == "q":
            loaded_weight = self._shard(param, loaded_weight, out_span=self._rank_span(q_size))
        else:
            loaded_weight = self._shard(param, loaded_weight, out_span=(self.first_kv_head * self.head_dim, kv_size))
        self.quant_method.weight_loader(self, param, loaded_weight, (offset, size))


class RowParallelLinear(LinearBase):
    """Each worker multiplies its slice of the inputs; partial outputs are summed over workers."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant_config: QuantizationConfig | None = None
    ) -> None:
        input_size = divide(input_size, get_tp_size(), "input size")
        super().__init__(input_size, output_size, bias, tp_dim=1, quant_config=quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.forward_partial(x))

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This worker's share of the output, before the all-reduce sums the shares."""
        # The bias joins on one worker only, so the all-reduce adds it once.
        return self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)

"""Token embedding and the LM head, vocabulary-parallel.

Each tensor-parallel worker holds a contiguous slice of the vocabulary rows:
the embedding looks up the tokens it owns (zeros for the others) and the
partial embeddings are summed over workers; the LM head computes logits for
its slice and the slices are gathered. With tied embeddings the LM head reuses
the embedding's parameter, so it is loaded (and stored) once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.models.layers.parallel import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size
from pagedllm.quantization.base import QuantizationMethod, copy_weight


class VocabEmbedding(nn.Module):
    """``quant_method`` (e.g. cpu_bf16) stores the matrix its way and multiplies it in the LM head;
    looked-up rows come back in the model dtype (the default dtype while the model is built)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, shared_weight: nn.Parameter | None = None,
        quant_method: QuantizationMethod | None = None,
    ) -> None:
        super().__init__()
        self.quant_method = quant_method
        self.out_dtype = torch.get_default_dtype()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        # The last worker's slice may be shorter; pad every slice to the same size.
        self.num_per_partition = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_per_partition
        self.vocab_end = min(self.vocab_start + self.num_per_partition, vocab_size)
        if shared_weight is not None:  # tied LM head: the embedding's parameter and loader
            self.weight = shared_weight
            return
        if quant_method is not None:
            quant_method.create_weights(self, hidden_size, self.num_per_partition, False, self.weight_loader)
        else:
            self.weight = nn.Parameter(torch.empty(self.num_per_partition, hidden_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        rows = loaded_weight[self.vocab_start : self.vocab_end]
        copy_weight(param.data[: rows.shape[0]], rows)
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, hidden)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight).to(self.out_dtype)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(owned, input_ids - self.vocab_start, 0)
        x = F.embedding(local_ids, self.weight).to(self.out_dtype) * owned.unsqueeze(-1).to(self.out_dtype)
        return all_reduce(x)


class LMHead(VocabEmbedding):
    """Hidden states -> logits over the whole vocabulary."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None,
        quant_method: QuantizationMethod | None = None,
    ) -> None:
        if tied_to is not None:
            quant_method = tied_to.quant_method  # one matrix, one storage
        super().__init__(vocab_size, hidden_size, tied_to.weight if tied_to is not None else None, quant_method)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, vocab)
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden, None)
        else:
            logits = F.linear(hidden, self.weight)
        return all_gather_last_dim(logits)[..., : self.vocab_size]

"""LoRALinear: a model's linear layer plus, for each token, the delta of its adapter.

After the weights load, the runner wraps each adaptable linear of every decoder layer
(``wrap_model``). A fused layer holds several PEFT targets side by side in its output:

    qkv_proj      q_proj | k_proj | v_proj        o_proj     (one target)
    gate_up_proj  gate_proj | up_proj             down_proj  (one target)

so each target's delta goes to its column range. Two ways to compute the deltas, both
reading the stacked per-slot weights of ``LoRASlots`` (all targets of a fused layer at once):

    CPU   per step, the tokens of each active slot (``LoRAState.segments``, built once per step
          by the manager): y[tokens] += (x[tokens] @ A.T) @ B.T, a matmul pair per adapter
    GPU   the Triton SGMV kernel (lora/triton_punica.py) over the step's plan (tokens grouped by
          slot) in the persistent input buffers: the same launches eager and in a CUDA graph

Tensor parallel: each rank holds its part of the adapters as of the base weights (a column-parallel
layer's rows of B, a row-parallel layer's columns of A), and a row-parallel layer adds its partial delta
before its one all-reduce (the sum over ranks of x_r A_r^T B^T is x A^T B^T). Pipeline parallel: a stage
wraps and loads only its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedllm.lora.slots import LoRASlots, ModuleTargets
from pagedllm.models.layers.linear import RowParallelLinear
from pagedllm.models.layers.parallel import all_reduce

# Our fused parameter -> the PEFT targets it holds, in output order.
FUSED_TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def target_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each PEFT target of one decoder layer (the full, unsplit model)."""
    from pagedllm.models.llama import get_head_dim

    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = get_head_dim(hf_config)
    q = hf_config.num_attention_heads * head_dim
    kv = (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads) * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


@dataclass
class LoRAState:
    """What every LoRALinear reads in a step; the manager fills it before the forward."""

    slots: LoRASlots
    max_loras: int
    active: bool = False  # some token of this step has an adapter (always, while CUDA graphs are captured)
    # GPU: the SGMV plan's device buffers (fixed addresses): perm (max tokens,) and blocks (3, capacity).
    perm: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    # CPU: (slot, the step's token indices with that slot, or None when every token has it).
    segments: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)


class LoRALinear(nn.Module):
    """``base(x)`` plus each token's adapter delta on the targets this layer fuses (one stacked
    shrink and one stacked expand for all of them: see ``LoRASlots``)."""

    def __init__(self, base: nn.Module, key: tuple[int, str], state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.key = key  # (layer, our fused layer's name): its stacked weights in LoRASlots
        self.state = state
        self.row_parallel = isinstance(base, RowParallelLinear) and base.tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_parallel:  # the delta joins the partial sums before the all-reduce
            return all_reduce(self._add_delta(self.base.forward_partial(x), x))
        return self._add_delta(self.base(x), x)

    def _add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.active:
            return y
        a, b = st.slots.a[self.key], st.slots.b[self.key]
        if st.perm is not None:
            from pagedllm.lora.triton_punica import add_lora_sgmv, num_plan_blocks

            return add_lora_sgmv(y, x, a, b, st.perm, st.blocks, num_plan_blocks(x.shape[0], st.max_loras))
        for slot, idx in st.segments:
            xs = x if idx is None else x.index_select(0, idx)
            delta = ((xs @ a[slot].t()) @ b[slot].t()).to(y.dtype)
            if idx is None:
                y += delta
            else:
                y.index_add_(0, idx, delta)
        return y


def wrap_model(model: nn.Module, state: LoRAState) -> dict[tuple[int, str], ModuleTargets]:
    """Wrap every adaptable linear of ``model``'s decoder layers; returns what each wrapped layer
    holds on this rank (the slots' stacked weights are shaped from it)."""
    modules: dict[tuple[int, str], ModuleTargets] = {}
    inner = model.model
    for i in range(inner.start_layer, inner.end_layer):  # this pipeline stage's layers
        layer = inner.layers[i]
        for parent in (layer.self_attn, layer.mlp):
            for fused, names in FUSED_TARGETS.items():
                base = getattr(parent, fused, None)
                if base is None:
                    continue
                targets, offset = [], 0
                for name, (width, out_start) in zip(names, _target_spans(base, fused)):
                    targets.append((name, offset, width, out_start))
                    offset += width
                in_start = base.tp_rank * base.input_size if base.tp_dim == 1 else 0
                modules[(i, fused)] = ModuleTargets(base.input_size, tuple(targets), in_start)
                setattr(parent, fused, LoRALinear(base, (i, fused), state))
    return modules


def _target_spans(base: nn.Module, fused: str) -> list[tuple[int, int]]:
    """(width, first row of the target's B) of each target this rank holds in ``base``'s output."""
    if fused == "qkv_proj":
        q, kv = base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim
        first_kv = base.first_kv_head * base.head_dim
        return [(q, base.tp_rank * q), (kv, first_kv), (kv, first_kv)]
    if fused == "gate_up_proj":
        return [(size // base.tp_size, base.tp_rank * size // base.tp_size) for size in base.output_sizes]
    if base.tp_dim == 0:
        return [(base.output_size, base.tp_rank * base.output_size)]
    return [(base.output_size, 0)]  # row-parallel: every output

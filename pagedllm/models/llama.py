"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 in one implementation.

They share one decoder block (pre-norm attention with RoPE and GQA, then a
SiLU-gated MLP); what differs is read from the HF config:

    Llama / Mistral   no biases (Llama: `attention_bias` adds them to q, k, v and o)
    Qwen2             bias on q, k, v (not on o)
    Qwen3             RMSNorm over each q and k head before RoPE

The model sees a flat batch of tokens (prefill chunks and decodes side by
side) with their positions; all cross-token work happens in the attention
backend, which reads and writes the paged KV cache.

Pipeline parallelism: each stage builds only its contiguous range of layers (the others are
``PPMissingLayer`` placeholders, so names keep their checkpoint indices); the first stage embeds, the
last normalizes and holds the LM head, and a middle stage's forward returns ``(hidden, residual)`` for
the next. Tensors of another stage's modules are skipped at load.

Checkpoint names are HF's. q/k/v and gate/up are fused into one matmul each,
so ``load_weights`` routes those tensors to the fused parameter's
``weight_loader`` with a shard id (``packed_modules_mapping``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.models.layers.activation import SiluAndMul
from pagedllm.models.layers.embedding import LMHead, VocabEmbedding
from pagedllm.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.models.layers.norm import RMSNorm
from pagedllm.models.layers.parallel import get_parallel_state, pp_layer_range
from pagedllm.models.layers.rotary import RopeTables, RotaryEmbedding, rope_parameters, rotate
from pagedllm.quantization.base import QuantizationConfig, copy_weight

# Checkpoint tensors that are derived state, not weights.
# input_scale: an FP8 checkpoint's static activation scale; activations are quantized per token here.
_IGNORED_WEIGHTS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", ".input_scale")


def get_head_dim(hf_config: Any) -> int:
    """``head_dim`` from the config when present (Qwen3, Mistral-Nemo), else hidden_size / heads."""
    head_dim = getattr(hf_config, "head_dim", None)
    return head_dim or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, attn_backend: AttentionBackend,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.head_dim = get_head_dim(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            bias=attention_bias or model_type == "qwen2", quant_config=quant_config,
        )
        self.num_heads = self.qkv_proj.num_heads  # of this tensor-parallel worker
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=attention_bias,
            quant_config=quant_config,
        )
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn_backend = attn_backend
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        rope: RopeTables,  # this step's rotary tables (RotaryEmbedding.tables)
        hidden: torch.Tensor,  # (T, hidden_size)
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden_size)
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm or self.rotary_emb.in_place:
            q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary_emb.apply(rope, q, k)
        else:  # q and k side by side in qkv: one rotation covers both (half the small ops on a CPU)
            qk = rotate(qkv[:, :q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim), rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn_backend.forward(q, k, v, kv_cache, attn_metadata, self.scale)  # (T, h, d)
        return self.o_proj(out.reshape(-1, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; the Llama family uses 'silu'")
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=mlp_bias, quant_config=quant_config
        )
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=mlp_bias, quant_config=quant_config
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, attn_backend: AttentionBackend,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, attn_backend, quant_config)
        self.mlp = LlamaMLP(config, quant_config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: RopeTables,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class PPMissingLayer(nn.Module):
    """The place of a layer another pipeline stage owns (no parameters, never called)."""

    def forward(self, *args: Any) -> None:
        raise RuntimeError("this layer belongs to another pipeline stage")


class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, attn_backend: AttentionBackend, quant_config: QuantizationConfig | None = None
    ) -> None:
        super().__init__()
        stage = get_parallel_state()
        self.start_layer, self.end_layer = pp_layer_range(config.num_hidden_layers, stage.pp_rank, stage.pp_size)
        theta, scaling = rope_parameters(config)
        # One cos/sin table shared by every layer.
        rotary_emb = RotaryEmbedding(get_head_dim(config), config.max_position_embeddings, theta, scaling)
        self.rotary_emb = rotary_emb
        embed_method = quant_config.get_embedding_method() if quant_config is not None else None
        self.embed_tokens = (VocabEmbedding(config.vocab_size, config.hidden_size, quant_method=embed_method)
                             if stage.is_first_stage else None)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, rotary_emb, attn_backend, quant_config)
             if self.start_layer <= i < self.end_layer else PPMissingLayer()
             for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if stage.is_last_stage else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],  # one per layer of this stage
        attn_metadata: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,  # the previous stage's output
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate
        layers = self.layers[self.start_layer:self.end_layer]
        rope = self.rotary_emb.tables(positions, hidden.dtype)  # once for all layers
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, attn_metadata)
        if self.norm is None:  # not the last stage: the next one continues from here
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache (the interface the model runner calls)."""

    # HF checkpoint name -> (fused parameter, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, hf_config: Any, attn_backend: AttentionBackend, quant_config: QuantizationConfig | None = None
    ) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, attn_backend, quant_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        # A last stage that is not also the first has no embedding to tie to: its head has its own copy.
        tied_to = self.model.embed_tokens if self.tie_word_embeddings else None
        head_method = quant_config.get_embedding_method() if quant_config is not None and tied_to is None else None
        self.lm_head = (LMHead(hf_config.vocab_size, hf_config.hidden_size, tied_to=tied_to, quant_method=head_method)
                        if get_parallel_state().is_last_stage else None)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[torch.Tensor],  # one per layer of this stage
        attn_metadata: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,  # pipeline parallel: from the stage before
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # (T, hidden_size), or (hidden, residual) mid-pipeline
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, vocab) fp32
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; every parameter must be filled. Returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, object]] = set()  # (parameter, shard id) pairs filled so far
        for name, tensor in weights:
            if name.endswith(_IGNORED_WEIGHTS):
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue  # some tied checkpoints store the shared matrix twice
            name = self._stage_name(name)
            if name is None:  # another pipeline stage's tensor
                continue
            param_name, shard_id = _route(name, self.packed_modules_mapping)
            param = params.get(param_name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    copy_weight(param.data, tensor)
                elif shard_id is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            loaded.add((param_name, shard_id))
        missing = sorted(f"{p}[{s}]" if s is not None else p for p, s in _expected(params, self) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return {p for p, _ in loaded}

    def _stage_name(self, name: str) -> str | None:
        """``name`` as this pipeline stage loads it: None for another stage's tensor; the embedding
        for the LM head of a tied last stage that does not embed."""
        if name.startswith("model.embed_tokens.") and self.model.embed_tokens is None:
            tied_head = self.tie_word_embeddings and self.lm_head is not None
            return "lm_head." + name.removeprefix("model.embed_tokens.") if tied_head else None
        if (name.startswith("model.norm.") and self.model.norm is None) or (
                name.startswith("lm_head.") and self.lm_head is None):
            return None
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if not self.model.start_layer <= index < self.model.end_layer:
                return None
        return name

    def other_stage_names(self, own_names: Iterable[str]) -> list[str]:
        """HF names of the tensors other pipeline stages load (``own_names``: this stage's), so a loader
        that looks tensors up by name knows them; with one stage, none (a tied head adds the embedding)."""
        names = [] if self.model.embed_tokens is not None else ["model.embed_tokens.weight"]
        if self.lm_head is None:
            names += ["model.norm.weight", "lm_head.weight"]
        layer_names = {n.split(".", 3)[3] for n in own_names if n.startswith("model.layers.")}
        for i in range(len(self.model.layers)):
            if not self.model.start_layer <= i < self.model.end_layer:
                names += [f"model.layers.{i}.{rest}" for rest in sorted(layer_names)]
        return names


def _expected(params: dict[str, nn.Parameter], model: LlamaForCausalLM) -> set[tuple[str, object]]:
    """Every (parameter, shard id) pair a complete checkpoint fills."""
    expected: set[tuple[str, object]] = set()
    for name in params:
        if getattr(params[name], "derived_from_weight", False):  # e.g. a scale computed when its weight loads
            continue
        shards = [sid for fused, sid in model.packed_modules_mapping.values() if f".{fused}." in name]
        expected.update((name, sid) for sid in shards or [None])
    return expected


def _route(name: str, mapping: dict[str, tuple[str, object]]) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, shard id or None)."""
    for hf_part, (fused, shard_id) in mapping.items():
        if f".{hf_part}." in name:
            return name.replace(f".{hf_part}.", f".{fused}."), shard_id
    return name, None

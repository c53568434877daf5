"""Draft-model speculation: a small model with the target's vocabulary drafts k tokens per request.

    speculative_config={"model": PATH, "num_speculative_tokens": k}

The draft runs inside the step that verifies its drafts, after the scheduler has allocated the
lookahead slots (positions T .. T+k-1 of a request with T known tokens):

    catch up   the draft's KV for positions it has not computed yet, up to T-2 (a new request's
               prompt; after a step, the bonus or first rejected position), in chunks
    draft      k one-token forwards: the token at T-1, then d1 at T, ... d_{k-1} at T+k-2; each
               draft is the draft model's argmax

The draft has its own KV tensors indexed by the target's block ids (so the same block tables
and slot mapping serve both, and a block's bytes include the draft's layers). After the target
accepts m drafts, the draft's KV is right through position T+m-1; the next step starts from
there. Drafts are deterministic, so the rejection sampler treats each as a point mass (as the
n-gram proposer's): the target's output distribution is unchanged, and whatever the draft's KV
holds (a prefix-cache block the draft never wrote, a swapped-in block) changes only how many
drafts are accepted, never which tokens come out.

Between steps the scheduler holds placeholder drafts (``placeholder_drafts``): their number is
what it schedules; their values are made here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pagedllm.config import ModelConfig
from pagedllm.models.layers.sampler import greedy_ids
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.worker.input_batch import FlatBatch, InputBatch, flat_logits_indices
from pagedllm.worker.input_buffers import InputBuffers

logger = logging.getLogger(__name__)


class DraftModel:
    def __init__(self, config: SpeculativeConfig, target: ModelConfig, device: torch.device, attn_backend,  # noqa: ANN001
                 block_size: int) -> None:
        from pagedllm.loader import load_model, resolve_model

        self.k = config.num_speculative_tokens
        self.block_size = block_size
        self.device = device
        dtype = str(target.torch_dtype).removeprefix("torch.")
        # A benchmark's random target (load_format "dummy") gets a random draft too.
        self.model_config = ModelConfig(model=config.model, dtype=dtype, max_model_len=target.max_model_len,
                                        seed=target.seed, load_format="dummy" if target.load_format == "dummy"
                                        else "auto")
        resolve_model(self.model_config, device)
        draft_vocab = self.model_config.hf_config.vocab_size
        if draft_vocab != target.hf_config.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocabulary ({draft_vocab} tokens) differs from "
                             f"the target's ({target.hf_config.vocab_size}); a draft must share the tokenizer")
        self.model = load_model(self.model_config, device, attn_backend).eval()
        self.kv_caches: list[torch.Tensor] = []
        self.computed: dict[str, int] = {}  # req_id -> positions whose draft KV is right
        logger.info("speculative decoding: draft model %s, %d tokens per step", config.model, self.k)

    # ---- KV cache ----------------------------------------------------------------------
    def kv_cache_shape(self, num_blocks: int) -> tuple[int, tuple[int, ...]]:
        from pagedllm.models.registry import kv_cache_shape_info

        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(self.model_config.hf_config)
        return num_layers, (num_blocks, 2, self.block_size, num_kv_heads, head_dim)

    def bytes_per_block(self, kv_dtype: torch.dtype) -> int:
        num_layers, shape = self.kv_cache_shape(1)
        return num_layers * int(np.prod(shape)) * torch.tensor([], dtype=kv_dtype).element_size()

    def allocate(self, num_blocks: int, kv_dtype: torch.dtype) -> None:
        num_layers, shape = self.kv_cache_shape(num_blocks)
        self.kv_caches = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(num_layers)]

    def forget(self, req_ids) -> None:  # noqa: ANN001 - any iterable of ids
        """Requests that left their rows (finished, preempted): their blocks may change."""
        for req_id in req_ids:
            self.computed.pop(req_id, None)

    @staticmethod
    def placeholder_drafts(k: int) -> list[int]:
        return [0] * k

    # ---- drafting ----------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, spec_tokens: dict[str, list[int]], ib: InputBatch, buffers: InputBuffers) -> None:
        """Fill each scheduled request's draft list (placeholders of the right length) in place."""
        req_ids = [r for r, d in spec_tokens.items() if d]
        if not req_ids:
            return
        rows = np.array([ib.req_id_to_row[r] for r in req_ids], dtype=np.int64)
        ends = ib.num_tokens[rows].astype(np.int64)  # T: known tokens
        starts = np.array([min(self.computed.get(r, 0), int(t) - 1) for r, t in zip(req_ids, ends)], dtype=np.int64)
        self._catch_up(rows, starts, ends - 1, ib, buffers)
        counts = np.array([len(spec_tokens[r]) for r in req_ids], dtype=np.int64)
        current = ib.token_ids[rows, ends - 1].astype(np.int64)  # each request's input at this draft step
        drafts = np.zeros((len(req_ids), int(counts.max())), dtype=np.int64)
        for j in range(int(counts.max())):
            active = np.flatnonzero(counts > j)
            drafts[active, j] = self._step(rows[active], ends[active] - 1 + j, current[active], ib, buffers)
            current[active] = drafts[active, j]
        for i, req_id in enumerate(req_ids):
            n = int(counts[i])
            spec_tokens[req_id][:] = drafts[i, :n].tolist()
            self.computed[req_id] = int(ends[i]) + n - 1

    def _catch_up(self, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray, ib: InputBatch,
                  buffers: InputBuffers) -> None:
        """The draft's KV for positions [start, stop) of each row, in batches the buffers hold."""
        cap = min(buffers.max_num_tokens, 4096)
        starts = starts.copy()
        while True:
            todo = np.flatnonzero(starts < stops)
            if not len(todo):
                return
            counts = np.minimum(stops[todo] - starts[todo], cap)
            keep = np.cumsum(counts) <= cap
            keep[0] = True
            todo, counts = todo[keep], counts[keep]
            self._forward(rows[todo], starts[todo], counts, ib, buffers, sample=False)
            starts[todo] += counts

    def _step(self, rows: np.ndarray, positions: np.ndarray, tokens: np.ndarray, ib: InputBatch,
              buffers: InputBuffers) -> np.ndarray:
        """One token per row at ``positions`` (``tokens``: their ids) -> the argmax next tokens."""
        return self._forward(rows, positions, np.ones(len(rows), dtype=np.int64), ib, buffers, sample=True,
                             input_ids=tokens)

    def _forward(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, ib: InputBatch,
                 buffers: InputBuffers, sample: bool, input_ids: np.ndarray | None = None) -> np.ndarray | None:
        n = len(rows)
        qsl = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        req_of_token = np.repeat(np.arange(n), counts)
        positions = starts[req_of_token] + (np.arange(int(qsl[-1])) - qsl[:-1][req_of_token])
        token_rows = rows[req_of_token]
        if input_ids is None:
            input_ids = ib.token_ids[token_rows, positions].astype(np.int64)
        block_idx = ib.block_table[token_rows, positions // self.block_size].astype(np.int64)
        seq_lens = (starts + counts).astype(np.int32)
        num_sampled = np.ones(n, dtype=np.int64) if sample else np.zeros(n, dtype=np.int64)
        width = int(-(-seq_lens.max() // self.block_size))
        batch = FlatBatch(
            req_ids=[str(r) for r in rows.tolist()], rows=rows, input_ids=input_ids, positions=positions,
            slot_mapping=block_idx * self.block_size + positions % self.block_size, query_start_loc=qsl,
            seq_lens=seq_lens, block_tables=ib.block_table[rows, :width], num_sampled_tokens=num_sampled,
            logits_indices=flat_logits_indices(qsl, num_sampled), max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()))
        ids, pos, md, logits_indices = buffers.load(batch)
        hidden = self.model(ids, pos, self.kv_caches, md)
        if not sample:
            return None
        return greedy_ids(self.model.compute_logits(hidden[logits_indices])).cpu().numpy()

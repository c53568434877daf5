"""The persistent device tensors one step's inputs are copied into, and their pinned host staging.

``StagingBuffers`` lays out named fields, ``(name, dtype, length)``, in one pinned
host tensor and one device tensor per dtype, so a step costs one host->device copy
per dtype (the used prefix) whatever the number of fields. ``InputBuffers`` names
the fields the model and the attention backend read:

    int64: input_ids (T) · positions (T) · slot_mapping (T) · logits_indices (T)
    int32: [lora_perm (T) · lora_blocks (3 x B)] · seq_lens (S) · query_start_loc (S + 1)
           · block_tables (S x max_num_blocks)

(lora_*: the LoRA SGMV plan, only with LoRA on a GPU: lora/triton_punica.py.)

T = max tokens per step, S = max sequences per step. Every field keeps a fixed
device address, so the views a CUDA graph captured stay valid for every later step.
On the CPU the staging arrays are the tensors the model reads (no copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata

if TYPE_CHECKING:
    from pagedllm.worker.input_batch import FlatBatch

# Every field starts on a multiple of 16 elements (Triton specialises kernels on pointer alignment).
_ALIGN = 16


class StagingBuffers:
    """Named fields in one pinned host tensor and one device tensor per dtype."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]], device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self._fields: dict[str, tuple[torch.dtype, int, int]] = {}  # name -> (dtype, offset, length)
        sizes: dict[torch.dtype, int] = {}
        for name, dtype, length in fields:
            offset = sizes.get(dtype, 0)
            self._fields[name] = (dtype, offset, length)
            sizes[dtype] = offset + -(-length // _ALIGN) * _ALIGN
        self._host = {dtype: torch.zeros(n, dtype=dtype, pin_memory=self.on_gpu) for dtype, n in sizes.items()}
        self._device = {dtype: t.to(device) if self.on_gpu else t for dtype, t in self._host.items()}
        # Whole-field views made once: a step slices each at most once (torch slicing costs
        # microseconds, and a batch-1 decode step's host work is on the critical path).
        self._host_views = {name: self._host[dtype].numpy()[offset:offset + length]
                            for name, (dtype, offset, length) in self._fields.items()}
        self._device_views = {name: self._device[dtype][offset:offset + length]
                              for name, (dtype, offset, length) in self._fields.items()}

    def host(self, name: str) -> np.ndarray:
        """The whole field in the host staging (a numpy view: writes go to the staging)."""
        return self._host_views[name]

    def device(self, name: str) -> torch.Tensor:
        """The whole field on the device (a view with a fixed address)."""
        return self._device_views[name]

    def copy_to_device(self, *last_fields: tuple[str, int]) -> None:
        """Copy, for each dtype, the staging prefix through its last field written this step:
        ``last_fields`` holds one (field, elements written) per dtype, the field that lies
        furthest into that dtype's staging. One non-blocking copy per dtype; no-op on the CPU."""
        if not self.on_gpu:
            return
        for name, n in last_fields:
            dtype, offset, _ = self._fields[name]
            end = offset + n
            self._device[dtype][:end].copy_(self._host[dtype][:end], non_blocking=True)


class InputBuffers:
    """Persistent device tensors for one step's inputs, filled from pinned host memory."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_num_blocks: int, device: torch.device,
                 lora_plan_blocks: int = 0) -> None:
        self.max_num_tokens, self.max_num_seqs, self.max_num_blocks = max_num_tokens, max_num_seqs, max_num_blocks
        self.device = device
        t, s, i64, i32 = max_num_tokens, max_num_seqs, torch.int64, torch.int32
        # Order within a dtype matters: each step copies the prefix through the last field written.
        self.lora_plan_blocks = lora_plan_blocks
        lora = [("lora_perm", i32, t), ("lora_blocks", i32, 3 * lora_plan_blocks)] if lora_plan_blocks else []
        self.staging = StagingBuffers([
            ("input_ids", i64, t), ("positions", i64, t), ("slot_mapping", i64, t), ("logits_indices", i64, t),
            *lora,
            ("seq_lens", i32, s), ("query_start_loc", i32, s + 1), ("block_tables", i32, s * max_num_blocks),
        ], device)
        self.staging.host("slot_mapping")[:] = -1  # padding tokens write nowhere
        if lora_plan_blocks:
            self.staging.host("lora_blocks")[:] = -1  # no adapter blocks
        # Recorded after each step's copies: the host waits on it before overwriting the staging.
        self._copied = torch.cuda.Event() if self.staging.on_gpu else None

    def load(self, batch: FlatBatch, pad_to: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata | None, torch.Tensor]:
        """Copy ``batch`` to the device: (input_ids, positions, metadata, logits_indices).

        ``pad_to`` (a CUDA-graph batch size, decode only) pads to that many one-token rows
        that write nowhere (slot -1) and attend to nothing (seq_len 0); the block table then
        spans its full width, as the captured graph reads it. A graph replay reads the
        buffers it captured, so with ``pad_to`` no metadata is built (None)."""
        n_tok, n_seq = batch.num_tokens, batch.num_reqs
        if n_tok > self.max_num_tokens or n_seq > self.max_num_seqs:
            raise ValueError(f"batch of {n_tok} tokens / {n_seq} sequences exceeds the input buffers "
                             f"({self.max_num_tokens} / {self.max_num_seqs})")
        rows = pad_to or n_seq
        n_pad_tok = n_tok + rows - n_seq
        width = self.max_num_blocks if pad_to else batch.block_tables.shape[1]
        num_logits = len(batch.logits_indices)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have read the staging
        host = self.staging.host
        input_ids, positions, slots = host("input_ids"), host("positions"), host("slot_mapping")
        input_ids[:n_tok] = batch.input_ids
        positions[:n_tok] = batch.positions
        slots[:n_tok] = batch.slot_mapping
        host("logits_indices")[:num_logits] = batch.logits_indices
        host("seq_lens")[:n_seq] = batch.seq_lens
        qsl = host("query_start_loc")[:rows + 1]
        qsl[:n_seq + 1] = batch.query_start_loc
        block_tables = host("block_tables")[:rows * width].reshape(rows, width)
        block_tables[:n_seq, :batch.block_tables.shape[1]] = batch.block_tables
        if self.lora_plan_blocks:
            if batch.lora_plan is None:
                host("lora_blocks")[:] = -1
            else:
                host("lora_perm")[:n_tok] = batch.lora_plan[0]
                host("lora_blocks")[:] = batch.lora_plan[1].reshape(-1)
        if pad_to:
            input_ids[n_tok:n_pad_tok] = 0
            positions[n_tok:n_pad_tok] = 0
            slots[n_tok:n_pad_tok] = -1
            host("seq_lens")[n_seq:rows] = 0
            qsl[n_seq + 1:] = np.arange(n_tok + 1, n_pad_tok + 1, dtype=np.int32)
        if self._copied is not None:
            # The fields of each dtype lie in the order declared in __init__.
            last_i64 = ("logits_indices", num_logits) if num_logits else ("slot_mapping", n_pad_tok)
            self.staging.copy_to_device(last_i64, ("block_tables", rows * width))
            self._copied.record()
        if batch.input_id_patch is not None:  # async scheduling: the previous step's tokens, from the device
            dst, values = batch.input_id_patch
            self.staging.device("input_ids").index_copy_(0, dst, values)
        logits_indices = self.staging.device("logits_indices")[:num_logits]
        if pad_to:
            return None, None, None, logits_indices
        md = self.metadata(rows, n_pad_tok, width, batch.max_query_len, batch.max_seq_len)
        md.num_actual_tokens = n_tok
        md.seq_lens_cpu = batch.seq_lens.tolist()
        md.query_start_loc_cpu = batch.query_start_loc.tolist()
        ids, pos = self.token_views(n_pad_tok)
        return ids, pos, md, logits_indices

    def fill_padding(self) -> None:
        """Set every device field to padding: token 0 at position 0, slot -1, seq_len 0, one query each."""
        dev = self.staging.device
        for name in ("input_ids", "positions", "seq_lens", "block_tables", "logits_indices"):
            dev(name).zero_()
        dev("slot_mapping").fill_(-1)
        if self.lora_plan_blocks:
            dev("lora_perm").zero_()
            dev("lora_blocks").fill_(-1)
        qsl = dev("query_start_loc")
        qsl.copy_(torch.arange(len(qsl), dtype=torch.int32))

    def metadata(self, rows: int, num_tokens: int, width: int, max_query_len: int,
                 max_seq_len: int) -> AttentionMetadata:
        """Attention metadata over views of the device buffers (what a CUDA graph captures)."""
        dev = self.staging.device
        return AttentionMetadata(
            slot_mapping=dev("slot_mapping")[:num_tokens], seq_lens=dev("seq_lens")[:rows],
            query_start_loc=dev("query_start_loc")[:rows + 1],
            block_tables=dev("block_tables")[:rows * width].view(rows, width),
            max_query_len=max_query_len, max_seq_len=max_seq_len, num_actual_tokens=num_tokens)

    def lora_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LoRA SGMV plan's device fields (fixed addresses): perm (T,) and blocks (3, B)."""
        return (self.staging.device("lora_perm"),
                self.staging.device("lora_blocks").view(3, self.lora_plan_blocks))

    def token_views(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) device views of the first ``num_tokens`` tokens."""
        return self.staging.device("input_ids")[:num_tokens], self.staging.device("positions")[:num_tokens]

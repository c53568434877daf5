"""Building the model on its device and filling its weights.

    resolve (if not done) -> build the nn.Module on `device` in `torch_dtype`
                             (linear layers get their quantization method from
                             ``ModelConfig.quantization``)
                          -> choose the element-wise kernels once (fused Triton on CUDA)
                          -> weights: HF safetensors | GGUF (dequantized) | dummy (random)

The module is built directly on the target device and dtype (no fp32 copy
on the host first), then each checkpoint tensor is copied into its parameter
by the parameter's ``weight_loader`` as it is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.config import ModelConfig
from pagedllm.loader.resolve import resolve_dtype, resolve_model
from pagedllm.models.layers.kernels import select_kernels
from pagedllm.models.registry import get_model_class
from pagedllm.quantization import checkpoint_quantization, get_quantization_config

logger = logging.getLogger(__name__)

# Dummy weights: small enough that activations stay tame in fp16 through many layers.
_DUMMY_RANGE = 0.02


# Older GPTQ / AWQ checkpoints keep their settings beside config.json (AutoGPTQ, AutoAWQ), as vLLM reads them.
_QUANT_CONFIG_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


def _checkpoint_quant_config(model_config: ModelConfig) -> dict | None:
    """The checkpoint's quantization settings: config.json's ``quantization_config``, else a
    ``quantize_config.json`` (GPTQ) or ``quant_config.json`` (AWQ) in the model directory."""
    found = getattr(model_config.hf_config, "quantization_config", None)
    if found is not None:
        return found if isinstance(found, dict) else found.to_dict()
    model_dir = model_config.model
    if model_config.load_format != "hf" or not model_dir or not os.path.isdir(model_dir):
        return None
    for name, method in _QUANT_CONFIG_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return {"quant_method": method, **json.load(f)}
    return None


def load_model(model_config: ModelConfig, device: torch.device | str, attn_backend: AttentionBackend) -> nn.Module:
    """The model of ``model_config`` on ``device`` with its weights loaded, in eval mode."""
    device = torch.device(device)
    if model_config.hf_config is None:
        resolve_model(model_config, device)
    hf_config = model_config.hf_config
    # "auto" depends on the device (float32 on CPU), which resolve_model may not have known.
    model_config.torch_dtype = resolve_dtype(model_config.dtype, hf_config, device)
    model_cls = get_model_class(hf_config)
    hf_quant_config = _checkpoint_quant_config(model_config)
    method = checkpoint_quantization(model_config.quantization, hf_quant_config)
    if method == "cpu_bf16" and hf_quant_config is None and model_config.load_format == "gguf":
        hf_quant_config = _int4_for_decode_steps(model_config.model)
    if method == "gguf":
        _check_gguf_quantization(model_config)
    quant_config = get_quantization_config(method, hf_quant_config)
    with _default_dtype(model_config.torch_dtype), device:
        model = model_cls(hf_config, attn_backend, quant_config=quant_config)
    select_kernels(model, device)
    fmt = model_config.load_format
    if fmt == "dummy":
        init_dummy_weights(model, model_config.seed)
    elif fmt == "gguf":
        from pagedllm.loader import gguf_reader
        from pagedllm.loader.gguf_loader import count_gguf_tensors, iter_gguf_weights

        names = hf_weight_names(model)
        if hasattr(model, "other_stage_names"):  # pipeline parallel: known, skipped at load
            names += model.other_stage_names(names)
        weights = iter_gguf_weights(model_config.model, hf_config, names,
                                    int4_codes=quant_config is not None and quant_config.needs_int4_codes)
        model.load_weights(_progress(weights, count_gguf_tensors(model_config.model)))
        del weights
        gguf_reader.release()
    elif fmt == "hf":
        from pagedllm.loader.safetensors_loader import count_safetensors, iter_safetensors_weights

        weights = iter_safetensors_weights(model_config.model)
        model.load_weights(_progress(weights, count_safetensors(model_config.model)))
    else:
        raise ValueError(f"load_format must be hf, gguf or dummy after resolution, got {fmt!r}")
    return model.eval()


def _check_gguf_quantization(model_config: ModelConfig) -> None:
    """``--quantization gguf`` needs a GGUF file whose linear layers are all 4-bit types it reads the codes of
    (dummy weights: random codes)."""
    from pagedllm.loader.gguf_dequant import INT4_TYPES
    from pagedllm.loader.gguf_loader import linear_weight_types

    if model_config.load_format == "dummy":
        return
    if model_config.load_format != "gguf":
        raise ValueError(f"quantization gguf needs a GGUF file; {model_config.model!r} loads as "
                         f"{model_config.load_format}")
    other = linear_weight_types(model_config.model) - INT4_TYPES
    if other:
        raise ValueError(f"quantization gguf: this file's linear layers include {', '.join(sorted(other))}, which "
                         f"have no 4-bit form here (supported: {', '.join(sorted(INT4_TYPES))}); load it without "
                         "--quantization gguf (dequantized)")


def _int4_for_decode_steps(path: str) -> dict | None:
    """cpu_bf16's settings for a GGUF: the file's 4-bit linear weights (Q4_0, Q4_1, Q4_K) are kept as their
    int4 codes too, for decode steps."""
    from pagedllm.loader.gguf_dequant import INT4_TYPES
    from pagedllm.loader.gguf_loader import linear_weight_types
    from pagedllm.quantization.cpu_bf16 import DEFAULT_INT4_SEQS

    types = linear_weight_types(path)
    if not types & INT4_TYPES:
        return None
    others = f"; {'/'.join(sorted(types - INT4_TYPES))} layers bf16 only" if types - INT4_TYPES else ""
    logger.info("CPU fast path: the GGUF's %s weights also kept as int4 for decode steps of up to %d sequences "
                "(bf16 for larger steps and prefills%s)", "/".join(sorted(types & INT4_TYPES)), DEFAULT_INT4_SEQS,
                others)
    return {"int4_seqs": DEFAULT_INT4_SEQS}


def _progress(weights: Iterator[tuple[str, torch.Tensor]], total: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with a tqdm bar on stderr (tqdm leaves it out when stderr is not a terminal)."""
    from tqdm import tqdm

    # No monitor thread: a process-directed SIGINT may land on any thread that does not block it, and one
    # landing on an idle helper thread never wakes a main thread blocked in input() (pagedllm chat's Ctrl-C).
    tqdm.monitor_interval = 0

    with tqdm(weights, total=total, desc="Loading weights", unit="tensor", disable=None, leave=False) as bar:
        yield from bar


def hf_weight_names(model: nn.Module) -> list[str]:
    """The HF checkpoint names the model's parameters are loaded from (fused parameters expanded)."""
    packed = getattr(model, "packed_modules_mapping", {})
    names = []
    for name, _ in model.named_parameters():
        parts = [hf for hf, (fused, _) in packed.items() if f".{fused}." in name]
        for hf in parts or [None]:
            names.append(name if hf is None else name.replace(f".{packed[hf][0]}.", f".{hf}."))
    return names


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights for benchmarks: uniform in +-0.02, norm scales 1, drawn on the parameter's device."""
    generator = None
    quantized = set()
    for module in model.modules():  # quantized layers draw float weights and quantize them
        init_dummy = getattr(getattr(module, "quant_method", None), "init_dummy", None)
        if init_dummy is not None:
            if generator is None:
                device = next(module.parameters()).device  # gptq/awq layers have no `weight`
                generator = torch.Generator(device=device).manual_seed(seed)
            init_dummy(module, generator, _DUMMY_RANGE)
            quantized.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        if id(param) in quantized:
            continue
        if generator is None:  # one stream, on the model's device: no host round trip
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.uniform_(-_DUMMY_RANGE, _DUMMY_RANGE, generator=generator)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created in the target dtype; the previous default comes back even on error.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)

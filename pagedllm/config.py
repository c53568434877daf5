"""Configuration: one small dataclass per component, and EngineArgs that builds them.

``EngineArgs`` is the user-facing bag of options (the ``LLM(...)`` keywords and
the CLI flags); each component receives only its own config.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # --- speculative decoding ---
    from pagedllm.spec_decode.config import SpeculativeConfig

_logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    model: str | None  # HF directory, .gguf file, or None for the default model
    load_format: str = "auto"  # auto | hf | gguf | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: from the model's config
    seed: int = 0
    tokenizer: str | None = None
    quantization: str | None = None  # None: dense weights; else a name in pagedllm.quantization
    revision: str | None = None  # Hugging Face Hub revision (branch, tag or commit) of a repo id
    download_dir: str | None = None  # Hub cache directory; None: huggingface_hub's default
    chat_template: str | None = None  # overrides the tokenizer's template (Jinja text)
    hf_config: Any = None  # filled by the loader: a transformers PretrainedConfig
    torch_dtype: Any = None  # filled by the loader: the torch.dtype weights and KV cache use


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None  # override profiling (tests, benchmarks)
    cpu_kv_cache_gib: float = 1.0  # KV cache budget when running on the CPU
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out blocks
    cache_dtype: str = "auto"  # auto: the model dtype; fp8: float8_e4m3fn (scale 1), half the bytes per block


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # EngineArgs.scheduler_config gives 2048 on a CPU (_default_step_tokens)
    max_model_len: int = 2048
    policy: str = "fcfs"  # fcfs | priority
    preemption_mode: str = "recompute"  # recompute | swap
    # Schedule step N+1 while step N runs (its sampled tokens stay on the device); see core/scheduler.py.
    async_scheduling: bool = False
    # Async scheduling: steps in flight once a step returns. More than one (pipeline parallel: one per stage,
    # each stage on its own batch) keeps a request out of a step while an earlier one carries it.
    max_concurrent_batches: int = 1
    # --- speculative decoding ---
    speculative_config: SpeculativeConfig | None = None  # None: speculation off
    lora_config: LoRAConfig | None = None  # None: LoRA off (--enable-lora)

    @property
    def num_speculative_tokens(self) -> int:
        """Drafts per request per step (0: speculation off)."""
        return self.speculative_config.num_speculative_tokens if self.speculative_config else 0
    # --- end speculative decoding ---


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (pagedllm/lora): adapter slots on the device and the cache of loaded adapters."""

    max_loras: int = 1  # distinct adapters in one step (device slots)
    max_lora_rank: int = 16  # slots are padded to this rank
    max_cpu_loras: int | None = None  # adapters kept loaded in CPU memory; None: max_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass
class DeviceConfig:
    device: str = "auto"  # auto | cpu | cuda
    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto | torch | cpu_sdpa | triton


@dataclass
class ParallelConfig:
    """How the model is split over devices; rank ``r`` of ``world_size`` runs on one of them."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Where the ranks meet (torch.distributed's init_method, e.g. tcp://host:port); set by the executor.
    distributed_init_method: str | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_gib: float = 1.0
    swap_space: float = 4.0
    kv_cache_dtype: str = "auto"  # auto | fp8 (fp8_e4m3): KV cache elements in float8_e4m3fn
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    device: str = "auto"
    enforce_eager: bool = False
    # None (auto): on with CUDA, off on the CPU (where nothing runs while the host schedules).
    async_scheduling: bool | None = None
    attention_backend: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # --- tp ---
    distributed_executor_backend: str | None = None  # uni | mp | ray; None: chosen from the world size
    # --- end tp ---
    served_model_name: str | None = None
    # --- lora ---
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # --- end lora ---
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks with dummy weights)
    # --- speculative decoding ---
    # vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 4}; parsed in __post_init__.
    speculative_config: dict[str, Any] | SpeculativeConfig | None = None
    # --- end speculative decoding ---
    # --- ux: model source, chat template, logging (vLLM's names) ---
    revision: str | None = None
    download_dir: str | None = None
    chat_template: str | None = None  # a Jinja file path or the template itself
    disable_log_requests: bool = True  # offline LLM: quiet; `pagedllm serve` turns request lines on
    disable_log_stats: bool = True  # offline LLM: quiet; `pagedllm serve` logs stats every few seconds
    max_log_len: int | None = None  # characters of a prompt shown in a request line (None: all)
    # --- end ux ---
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.load_format == "safetensors":  # vLLM's name for a HF safetensors checkpoint
            self.load_format = "hf"
        if self.load_format not in ("auto", "hf", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, hf, gguf or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp32", "fp16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.kv_cache_dtype == "fp8_e4m3":  # vLLM's two names of the one format
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {self.kv_cache_dtype!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        self._check_parallel_and_quantization()
        self.lora_config()  # --- lora: bad limits fail here, naming the field
        # --- tp ---
        from pagedllm.executor.backends import resolve_backend  # torch-free

        resolve_backend(self.distributed_executor_backend, self.parallel_config().world_size)
        # --- end tp ---
        # --- speculative decoding ---
        if self.speculative_config is not None:
            from pagedllm.spec_decode.config import SpeculativeConfig

            if not isinstance(self.speculative_config, SpeculativeConfig):
                self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
            self.speculative_config.check_implemented()
        # --- end speculative decoding ---

    def _check_parallel_and_quantization(self) -> None:
        from pagedllm.quantization import check_quantization  # torch-free: keeps this module light

        check_quantization(self.quantization)
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            size = getattr(self, name)
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        if self.tensor_parallel_size * self.pipeline_parallel_size == 1:
            return
        # What does not split over ranks yet, refused by name.
        spec = self.speculative_config
        if spec is not None and (spec.get("model") if isinstance(spec, dict) else getattr(spec, "model", None)):
            raise ValueError("speculative_config with a draft model is not supported with tensor/pipeline "
                             "parallelism yet (the n-gram method is)")

    # ---- component configs -------------------------------------------------
    def model_config(self, resolve_quantization: bool = True) -> ModelConfig:
        """The model's settings; ``resolve_quantization=False`` (an API front end: config and tokenizer only)
        leaves ``quantization`` as given instead of deciding the CPU fast path (which imports torch)."""
        quantization = self.resolved_quantization() if resolve_quantization else self.quantization
        return ModelConfig(
            model=self.model, load_format=self.load_format, dtype=self.dtype,
            max_model_len=self.max_model_len, seed=self.seed, tokenizer=self.tokenizer,
            quantization=quantization, revision=self.revision, download_dir=self.download_dir,
            chat_template=_read_chat_template(self.chat_template),
        )

    # --- CPU fast path (issue 17) -------------------------------------------
    def resolved_quantization(self) -> str | None:
        """``quantization``, or the CPU fast path's ``cpu_bf16`` when the model runs on a CPU with every
        precision setting left at its default (``--dtype float32`` keeps exact fp32 weights)."""
        if self.quantization is not None or self.dtype != "auto" or self.device == "cuda":
            return self.quantization
        import torch  # here, not at import: EngineArgs stays light for the CLI

        if self.device == "auto" and torch.cuda.is_available():
            return self.quantization
        _logger.info("CPU fast path: bf16 weights and KV cache, fp32 activations (quantization=cpu_bf16), attention "
                     "backend %s, %d threads; --dtype float32 for exact fp32",
                     "cpu_sdpa" if self.attention_backend == "auto" else self.attention_backend,
                     torch.get_num_threads())
        return "cpu_bf16"
    # --- end CPU fast path ----------------------------------------------------

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization, num_gpu_blocks=self.num_gpu_blocks_override,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib, swap_space=self.swap_space, cache_dtype=self.kv_cache_dtype,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens or max(self._default_step_tokens(), self.max_num_seqs)
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
            policy=self.scheduling_policy, preemption_mode=self.preemption_mode,
            async_scheduling=self.resolved_async_scheduling(),
            max_concurrent_batches=self.pipeline_parallel_size,
            speculative_config=self.speculative_config,  # --- speculative decoding ---
            lora_config=self.lora_config(),
        )

    def lora_config(self) -> LoRAConfig | None:
        """The LoRA limits when ``enable_lora``; None (LoRA off) otherwise."""
        if not self.enable_lora:
            return None
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras)

    def resolved_async_scheduling(self) -> bool:
        """``async_scheduling``, or auto (None): on where a GPU runs the steps and speculation is off
        (measured in benchmarks/RESULTS.md)."""
        if self.async_scheduling is not None:
            if self.async_scheduling and self.speculative_config is not None:
                raise ValueError("async_scheduling does not combine with speculative_config yet: "
                                 "drafts are proposed from the host's tokens (use --no-async-scheduling)")
            return self.async_scheduling
        if self.speculative_config is not None:
            return False
        if self.pipeline_parallel_size > 1:  # the stages work on different batches at once
            return True
        if self.device == "cpu":
            return False
        import torch  # here, not at import: EngineArgs stays light for the CLI

        return torch.cuda.is_available()

    def _default_step_tokens(self) -> int:
        """8192 on a GPU; 2048 on a CPU, where 64 short prompts prefill as fast in 2048-token steps and the
        step's temporaries, which the allocator keeps, take a quarter of the memory (peak RSS of serve64
        ~1.15-1.42 -> 1.16 GB for the engine; a 4096-token prompt prefills ~15% slower: docs/CPU.md)."""
        if self.device == "cuda":
            return 8192
        import torch  # here, not at import: EngineArgs stays light for the CLI

        return 8192 if self.device == "auto" and torch.cuda.is_available() else 2048

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                              pipeline_parallel_size=self.pipeline_parallel_size)

    def device_config(self) -> DeviceConfig:
        return DeviceConfig(device=self.device, enforce_eager=self.enforce_eager,
                            attention_backend=self.attention_backend)

    # ---- CLI ---------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
        """The engine's flags under vLLM's names; every flag's help ends with its default."""
        if model_positional:
            parser.add_argument("model_tag", nargs="?", default=None,
                                help="model: a HF directory, a .gguf file or a Hub repo id (org/name)")
        add = parser.add_argument
        add("--model", default=None, help="HF model directory, .gguf file or Hub repo id; None: SmolLM2-135M")
        add("--tokenizer", default=None, help="tokenizer directory, .gguf or Hub repo id; None: the model's")
        add("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id")
        add("--download-dir", default=None, help="Hub cache directory; None: huggingface_hub's default")
        add("--load-format", default="auto", choices=["auto", "hf", "safetensors", "gguf", "dummy"],
            help="weight format; auto: from the path (safetensors is an alias of hf)")
        add("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (auto: the checkpoint's; on the "
                                            "CPU the fast path: bf16 weights, fp32 activations)")
        add("--max-model-len", type=int, default=None, help="context length; None: the model's own")
        add("--seed", type=int, default=0, help="seed of the engine's random state")
        add("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
        add("--enable-prefix-caching", dest="enable_prefix_caching", action=argparse.BooleanOptionalAction,
            default=True, help="reuse the KV cache of shared prompt prefixes")
        add("--gpu-memory-utilization", type=float, default=0.9,
            help="fraction of GPU memory for weights, activations and KV cache")
        add("--num-gpu-blocks-override", type=int, default=None, help="KV cache blocks, instead of profiling")
        add("--cpu-kv-cache-gib", type=float, default=1.0, help="KV cache size on the CPU, in GiB")
        add("--swap-space", type=float, default=4.0, help="CPU memory for swapped-out KV blocks, in GiB")
        add("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
            help="KV cache element type; fp8: float8 e4m3 (scale 1), twice the blocks; auto: the model dtype")
        add("--max-num-seqs", type=int, default=256, help="requests running at once")
        add("--max-num-batched-tokens", type=int, default=None,
            help="tokens per step (prefill chunks and decodes); None: max(8192 on a GPU, 2048 on a CPU, "
                 "max-num-seqs)")
        add("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"], help="order of waiting requests")
        add("--preemption-mode", default="recompute", choices=["recompute", "swap"],
            help="what happens to a preempted request's KV cache")
        add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
        add("--enforce-eager", action="store_true", help="no CUDA graphs")
        add("--async-scheduling", dest="async_scheduling", action=argparse.BooleanOptionalAction, default=None,
            help="schedule the next step while the GPU runs this one; None: on with CUDA, off on the CPU")
        add("--attention-backend", default="auto", choices=["auto", "torch", "cpu_sdpa", "triton"],
            help="auto: Triton on CUDA, cpu_sdpa on the CPU (torch: the slow reference)")
        add("--quantization", "-q", default=None, help="weight quantization method; None: dense weights")
        add("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs for tensor parallelism")
        add("--pipeline-parallel-size", "-pp", type=int, default=1, help="pipeline stages")
        # --- tp ---
        add("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
            help="where workers run: uni (this process), mp (a process per rank); None: uni for one GPU")
        # --- end tp ---
        add("--served-model-name", nargs="+", default=None,
            help="model name(s) in the API (the first is reported); None: the model path")
        _add_lora_cli_args(parser)
        add("--skip-tokenizer-init", action="store_true", help="token ids in and out only, no tokenizer")
        add("--chat-template", default=None, help="chat template (a Jinja file or the template); "
                                                  "None: the tokenizer's")
        add("--max-log-len", type=int, default=None, help="prompt characters shown in a request log line; "
                                                          "None: all")
        # --- speculative decoding ---
        parser.add_argument("--speculative-config", type=_speculative_config, default=None,
                            help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
                                 '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\'')
        # --- end speculative decoding ---

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in vars(ns).items() if k in names}
        names_given = kwargs.get("served_model_name")
        if isinstance(names_given, list) and len(names_given) == 1:
            kwargs["served_model_name"] = names_given[0]
        if getattr(ns, "model_tag", None):
            kwargs["model"] = ns.model_tag
        return cls(**kwargs)


def _add_lora_cli_args(parser: argparse.ArgumentParser) -> None:
    """The multi-LoRA flags (vLLM's names); ``--lora-modules`` is the server's."""
    add = parser.add_argument
    add("--enable-lora", action="store_true", help="serve LoRA adapters (--lora-modules, lora_request)")
    add("--max-loras", type=int, default=1, help="distinct LoRA adapters in one step (device slots)")
    add("--max-lora-rank", type=int, default=16, help="largest LoRA rank served")
    add("--max-cpu-loras", type=int, default=None, help="LoRA adapters kept in CPU memory; None: max-loras")


# --- speculative decoding ---
def _speculative_config(text: str) -> SpeculativeConfig:
    """argparse type of --speculative-config: a JSON object of SpeculativeConfig keys (argparse
    reports a bad one as a usage error, before any model is loaded)."""
    import json

    from pagedllm.spec_decode.config import SpeculativeConfig

    try:
        return SpeculativeConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
# --- end speculative decoding ---
def _read_chat_template(template: str | None) -> str | None:
    """``--chat-template``: a file's text, or the template given inline (as vLLM takes it)."""
    import os

    if template is None:
        return None
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    if "{" not in template:  # neither a file nor Jinja: most likely a mistyped path
        raise ValueError(f"chat_template: {template!r} is not a file and does not look like a Jinja template")
    return template

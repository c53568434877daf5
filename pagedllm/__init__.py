"""pagedllm: LLM inference and serving with a paged KV cache and continuous batching."""

from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "LoRARequest", "RequestOutput", "CompletionOutput",
           "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch; load it only when LLM is asked for.
    if name == "LLM":
        from pagedllm.engine.llm import LLM

        return LLM
    raise AttributeError(name)

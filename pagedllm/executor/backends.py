"""Which executor runs the workers: ``--distributed-executor-backend uni|mp|ray``.

Left unset it is chosen as vLLM does: ``uni`` (in this process) for a world of one,
``mp`` (one process per rank) for a larger world on this host. Torch-free and
config-free: ``EngineArgs`` checks the name through it.
"""

from __future__ import annotations

BACKENDS = ("uni", "mp", "ray")


def resolve_backend(backend: str | None, world_size: int) -> str:
    """The backend name to use; a ValueError naming the field for one pagedllm lacks."""
    if backend is None:
        return "uni" if world_size == 1 else "mp"
    if backend not in BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "ray":
        raise ValueError("distributed_executor_backend='ray' is not supported yet (use uni or mp)")
    return backend

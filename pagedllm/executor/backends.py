"""Which executor runs the workers: ``--distributed-executor-backend uni|mp|ray``.

Left unset it is chosen as vLLM does: ``uni`` (in this process) for a world of one;
``ray`` when a Ray cluster is already connected in this process or the world needs more
GPUs than this host has; ``mp`` (one process per rank on this host) otherwise.
Torch-free: ``EngineArgs`` checks the name through it.
"""

from __future__ import annotations

import sys

BACKENDS = ("uni", "mp", "ray")


def resolve_backend(backend: str | None, world_size: int, local_gpus: int | None = None) -> str:
    """The backend name to use (``local_gpus``: this host's GPU count, when known); a ValueError
    naming the field for a bad one."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "uni" and world_size > 1:
        raise ValueError(f"distributed_executor_backend='uni' runs one worker; a world of {world_size} "
                         "needs mp or ray")
    if backend is not None:
        return backend
    if world_size == 1:
        return "uni"
    ray = sys.modules.get("ray")  # never imported here: Ray is heavy and optional
    if ray is not None and ray.is_initialized():
        return "ray"
    if local_gpus and local_gpus < world_size:
        return "ray"
    return "mp"

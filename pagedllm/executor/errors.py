"""Executor errors the engine treats as fatal (torch-free)."""

from __future__ import annotations


class ExecutorDeadError(RuntimeError):
    """A worker died, or a rank of a larger world failed mid-step (its peers may wait for it in a
    collective forever): no later step can run. The engine fails its requests and reports itself dead."""

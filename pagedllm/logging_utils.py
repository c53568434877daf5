"""pagedllm's log output: one handler on the ``pagedllm`` logger, and timed start-up phases.

    INFO 12-04 01:02:03 [llm_engine] config: llama, max_model_len 8192, float32 (0.41 s)

``configure_logging`` is called by the entry points (``LLM``, the CLI, the server),
never at import, and leaves alone a process that set up logging itself (a handler
on the root or ``pagedllm`` logger) or that sets ``PAGEDLLM_CONFIGURE_LOGGING=0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

LOGGER_NAME = "pagedllm"
_FORMAT = "%(levelname)s %(asctime)s [%(module)s] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str | int | None = None) -> None:
    """A stderr handler on the ``pagedllm`` logger at ``level`` (default INFO, or $PAGEDLLM_LOGGING_LEVEL)."""
    logger = logging.getLogger(LOGGER_NAME)
    if level is None:
        level = os.environ.get("PAGEDLLM_LOGGING_LEVEL", "INFO")
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
        level = getattr(logging, level.upper())
    logger.setLevel(level)
    if os.environ.get("PAGEDLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    if logger.handlers or logging.getLogger().handlers:  # the application chose its own output
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False


class Phase:
    """What a timed phase reports; ``detail`` may be set inside the ``with`` block."""

    def __init__(self, name: str) -> None:
        self.name, self.detail, self.seconds = name, "", 0.0


@contextlib.contextmanager
def log_phase(logger: logging.Logger, name: str) -> Iterator[Phase]:
    """Log ``name: detail (N.NN s)`` once the block finishes (start-up phases: config, weights, ...)."""
    phase = Phase(name)
    start = time.perf_counter()
    yield phase
    phase.seconds = time.perf_counter() - start
    # stacklevel 3: the record names the module of the `with` (past contextlib's __exit__), not this one.
    logger.info("%s%s (%.2f s)", name, f": {phase.detail}" if phase.detail else "", phase.seconds, stacklevel=3)


def wants_traceback(debug: bool = False) -> bool:
    """A traceback is shown for ``--debug`` or a DEBUG log level (flag or $PAGEDLLM_LOGGING_LEVEL)."""
    return debug or logging.getLogger(LOGGER_NAME).isEnabledFor(logging.DEBUG) or \
        os.environ.get("PAGEDLLM_LOGGING_LEVEL", "").upper() == "DEBUG"


def exit_on_error(prog: str, error: BaseException, debug: bool = False) -> None:
    """Report ``error`` as one line on stderr and exit 1 (130 for Ctrl-C); the traceback only when asked.

    Every subcommand ends this way: a bad path, an unknown architecture, a port in use
    or a context longer than the KV cache is the user's to fix, not a stack to read.
    """
    if isinstance(error, KeyboardInterrupt):
        print(file=sys.stderr)
        sys.exit(130)
    if wants_traceback(debug):
        import traceback

        traceback.print_exception(error)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not isinstance(error, (ValueError, OSError)):  # not an input error: name it, point at the traceback
        message = f"{type(error).__name__}: {message}"
        if not wants_traceback(debug):
            message += " (run with --debug for the traceback)"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(1)

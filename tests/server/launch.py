"""Start the real server as a subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`python -m pagedllm.server.api_server --port <free> *args`; returns the process and base URL once
    /health is 200. The caller ends the process (``running_server`` does it for you)."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.server.api_server", "--port", str(port), "--uvicorn-log-level",
           "warning", *args]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=Path(__file__).resolve().parents[2])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return proc, base
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@contextlib.contextmanager
def server_process(log: Path, *args: str, timeout: float = 300) -> Iterator[tuple[subprocess.Popen, str]]:
    """``start_server`` as a context manager: yields (process, base URL), terminates the server on exit."""
    proc, base = start_server(log, *args, timeout=timeout)
    try:
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def running_server(log: Path, *args: str, timeout: float = 300) -> Iterator[str]:
    """``server_process`` yielding only the base URL."""
    with server_process(log, *args, timeout=timeout) as (_, base):
        yield base

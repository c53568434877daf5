"""`pagedllm serve -pp 2` on the default model: the real server and the openai client get the tokens
of one process; a killed worker fails the request in flight with a clear 503 and turns /health 503
(with --no-exit-on-engine-death; by default the server then exits 1 for a supervisor to restart it);
no rank outlives the server, after a worker's death or a SIGTERM."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.executor.test_mp_executor import _alive
from tests.server.launch import server_process

PROMPT = "The capital of France is"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _worker_pids(server_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"spawn_main" in cmdline:  # the ranks' processes (not the engine core, not a resource tracker)
            pids.append(pid)
    return sorted(pids)


def test_pipeline_parallel_server_answers_then_a_dead_worker_is_a_clear_503(tmp_path: Path) -> None:
    llm = LLM(dtype="float32", device="cpu")
    expected = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0].text
    del llm
    gc.collect()
    with server_process(tmp_path / "server.log", "--dtype", "float32", "--device", "cpu",
                        "--pipeline-parallel-size", "2", "--no-exit-on-engine-death") as (proc, base):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0)
        assert reply.choices[0].text == expected
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0)
        assert failed.value.status_code == 503, failed.value
        assert "worker rank" in str(failed.value) and "died" in str(failed.value)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503"
            time.sleep(0.2)
    deadline = time.monotonic() + 10  # the surviving rank goes with the engine: no orphan
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def test_sigterm_stops_every_rank(tmp_path: Path) -> None:
    with server_process(tmp_path / "server.log", "--dtype", "float32", "--device", "cpu",
                        "--pipeline-parallel-size", "2") as (proc, _):
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)

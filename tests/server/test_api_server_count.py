"""The engine core process and --api-server-count, against the real server (engine/core_*.py, lifecycle.py).

One server with two HTTP front ends on one port: both answer, they share the one
engine process; killing the engine fails a stream in flight within seconds and
turns /health into 503 on every front end; killing the first front end (the
parent) takes the other front end down with it (the engine process uses the same
``die_with_parent``). A second, plain server checks that SIGTERM leaves no engine
process behind.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagedllm.config import EngineArgs
from pagedllm.server.api_server import _serve_processes, make_arg_parser
from tests.server.launch import server_process

MODEL = "SmolLM2-135M-Instruct"
ARGS = ("--max-model-len", "256")


def _children(pid: int) -> dict[str, list[int]]:
    """This process's children by role, from /proc: {"engine": [...], "front_end": [...]}."""
    found: dict[str, list[int]] = {"engine": [], "front_end": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        if "pagedllm.engine.core_proc" in cmdline:
            found["engine"].append(int(entry.name))
        elif "pagedllm.server.api_server" in cmdline:
            found["front_end"].append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _fresh_get(url: str) -> httpx.Response:
    # A new connection each time: the kernel picks a front end per connection (SO_REUSEPORT).
    with httpx.Client(timeout=30) as client:
        return client.get(url)


def _stream(base: str, result: dict) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"error"' not in line:
                    result["started"] = time.monotonic()
                elif '"error"' in line:
                    result["error"], result["error_at"] = line, time.monotonic()
    except httpx.HTTPError as e:
        result["error"], result["error_at"] = repr(e), time.monotonic()


def test_two_front_ends_share_the_engine_fail_fast_on_its_death_and_die_with_the_parent(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    # No --max-model-len: the front ends learn the model's limit (8192, from the GGUF) from the engine.
    with server_process(log, "--api-server-count", "2", "--no-exit-on-engine-death") as (proc, base):
        kids = _children(proc.pid)
        assert len(kids["engine"]) == 1 and len(kids["front_end"]) == 1, kids
        engine, front_end = kids["engine"][0], kids["front_end"][0]
        assert not _children(front_end)["engine"]  # the second front end starts no engine of its own
        for i in range(16):
            with httpx.Client(timeout=60) as client:
                r = client.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": f"Number {i}:",
                                                                "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        # Each front end has its own metrics registry: two non-zero totals show that both served (a total
        # may still miss the last request: its metrics are recorded as its response goes out). A front end
        # is told apart by its process start time (its ProcessCollector), not by its count: both may be 8.
        counts: dict[str, float] = {}
        for _ in range(20):
            text = _fresh_get(f"{base}/metrics").text
            started = re.search(r'^process_start_time_seconds (\S+)', text, re.M)
            assert started, text[:2000]
            counts[started.group(1)] = sum(
                float(v) for v in re.findall(r'^pagedllm:request_success_total\{[^}]*\} (\S+)', text, re.M))
        assert len(counts) == 2 and min(counts.values()) > 0 and sum(counts.values()) <= 16, counts
        # The front ends import no torch (their model config comes from the engine's first heartbeat): both
        # report the engine's limit, and tokenizing / chat templates / detokenizing ran without torch.
        for _ in range(4):
            models = _fresh_get(f"{base}/v1/models").json()["data"]
            assert [m["max_model_len"] for m in models] == [8192], models
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{base}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text, r.text
        assert not _maps_torch(proc.pid) and not _maps_torch(front_end)
        assert _maps_torch(engine)  # the check sees torch where it is loaded

        result: dict = {}
        reader = threading.Thread(target=_stream, args=(base, result))
        reader.start()
        deadline = time.monotonic() + 60
        while "started" not in result and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "started" in result, log.read_text()[-2000:]
        killed_at = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        reader.join(30)
        assert "engine" in result.get("error", ""), result
        assert result["error_at"] - killed_at < 5.0, result
        deadline = time.monotonic() + 15  # the second front end learns it from the pid check (0.25 s tick)
        statuses = [_fresh_get(f"{base}/health").status_code for _ in range(10)]
        while set(statuses) != {503} and time.monotonic() < deadline:
            time.sleep(0.5)
            statuses = [_fresh_get(f"{base}/health").status_code for _ in range(10)]
        assert set(statuses) == {503}, statuses
        with httpx.Client(timeout=30) as client:
            refused = client.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"], refused.text

        proc.kill()  # the parent dies without a word: its children must not outlive it
        proc.wait()
        assert _wait_gone([front_end], 10.0) == [], "the second front end outlived its parent"


def test_sigterm_leaves_no_engine_process(tmp_path: Path) -> None:
    with server_process(tmp_path / "a.log", *ARGS) as (proc, base):
        engine = _children(proc.pid)["engine"]
        assert len(engine) == 1
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _wait_gone(engine, 10.0) == [], "the engine process outlived a SIGTERM of the server"


def test_process_flags() -> None:
    args = make_arg_parser().parse_args(["--api-server-count", "3", "--engine-in-process"])
    assert (args.api_server_count, args.engine_in_process, args.front_end_of) == (3, True, None)
    with pytest.raises(SystemExit, match="--api-server-count > 1 needs the engine in its own process"):
        _serve_processes([], args, EngineArgs())
    with pytest.raises(SystemExit):
        make_arg_parser().parse_args(["--api-server-count", "0"])
    assert make_arg_parser().parse_args([]).api_server_count == 1

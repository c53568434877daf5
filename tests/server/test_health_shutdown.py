"""/health, drain on SIGTERM and exit on engine death (server/lifecycle.py).

The health and engine-death cases run in-process over the toy engine (a step
held on a gate, a broken engine); SIGTERM during streams runs against the real
server as a subprocess, because exit status and leftover threads are what it is about.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.api_server import build_app, make_arg_parser
from pagedllm.server.lifecycle import LifecycleConfig, PagedServer
from tests.server.launch import free_port, start_server
from tests.server.toy_engine import ToyEngine

MODEL = "SmolLM2-135M-Instruct"
BODY = {"model": "toy-model", "prompt": "abc", "max_tokens": 5}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_health_fails_while_a_step_is_stuck_and_recovers():
    engine = ToyEngine()
    engine.step_gate = threading.Event()
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, "toy-model", lifecycle=LifecycleConfig(health_stall_timeout=0.3))

    async def run() -> None:
        async with _client(app) as client:
            assert (await client.get("/health")).status_code == 200
            pending = asyncio.create_task(client.post("/v1/completions", json=BODY))
            await asyncio.to_thread(engine.step_entered.wait, 5)
            assert (await client.get("/health")).status_code == 200  # busy, not yet stalled
            await asyncio.sleep(0.5)
            stuck = await client.get("/health")
            assert stuck.status_code == 503 and "no progress" in stuck.json()["error"]["message"]
            engine.step_gate.set()
            assert (await pending).status_code == 200
            assert (await client.get("/health")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'pagedllm:num_requests_in_flight{model_name="toy-model"} 0.0' in metrics

    try:
        asyncio.run(run())
    finally:
        engine.step_gate.set()
        async_engine.shutdown()


def test_stats_gauges_refresh_without_steps():
    engine = ToyEngine()
    async_engine = AsyncEngine(engine)
    try:
        deadline = time.monotonic() + 5
        while async_engine.get_stats() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # no request, no step: only the idle tick can publish stats
        assert async_engine.get_stats() is not None
    finally:
        async_engine.shutdown()


def test_health_and_requests_503_once_the_engine_is_dead():
    async_engine = AsyncEngine(ToyEngine())
    async_engine.shutdown()
    app = build_app(async_engine, "toy-model")

    async def run() -> None:
        async with _client(app) as client:
            assert (await client.get("/health")).status_code == 503
            response = await client.post("/v1/completions", json=BODY)
            assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"

    asyncio.run(run())


def _break_engine(engine: ToyEngine) -> None:
    def broken() -> bool:
        raise RuntimeError("device lost")

    engine.has_unfinished_requests = broken


@pytest.mark.parametrize("exit_on_death", [True, False])
def test_engine_death_fails_pending_requests_and_exits_1(exit_on_death: bool):
    engine = ToyEngine()
    engine.step_gate = threading.Event()
    async_engine = AsyncEngine(engine)
    lifecycle = LifecycleConfig(exit_on_engine_death=exit_on_death)
    app = build_app(async_engine, "toy-model", lifecycle=lifecycle)
    port = free_port()
    server = PagedServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), async_engine,
                         lifecycle)

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while not server.started:
                await asyncio.sleep(0.05)
            pending = asyncio.create_task(client.post("/v1/completions", json=BODY))
            await asyncio.to_thread(engine.step_entered.wait, 5)
            _break_engine(engine)
            engine.step_gate.set()
            failed = await pending
            assert failed.status_code == 503 and "device lost" in failed.json()["error"]["message"]
            if not exit_on_death:
                await asyncio.sleep(0.5)  # several ticks: the server must still be serving
                assert (await client.get("/health")).status_code == 503
                server.should_exit = True
        await asyncio.wait_for(serving, 10)

    try:
        asyncio.run(run())
    finally:
        engine.step_gate.set()
        async_engine.shutdown()
    assert server.exit_code == (1 if exit_on_death else 0)


def test_drain_in_process_finishes_short_aborts_long_and_refuses_new():
    engine = ToyEngine(max_model_len=512, step_delay=0.02)
    async_engine = AsyncEngine(engine)
    lifecycle = LifecycleConfig(shutdown_timeout=0.6)
    app = build_app(async_engine, "toy-model", lifecycle=lifecycle)
    port = free_port()
    server = PagedServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), async_engine,
                         lifecycle)

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        serving = asyncio.create_task(server.serve())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while not server.started:
                await asyncio.sleep(0.05)
            short = asyncio.create_task(client.post("/v1/completions", json={**BODY, "max_tokens": 10}))
            long_ = asyncio.create_task(client.post("/v1/completions", json={**BODY, "max_tokens": 400}))
            while async_engine.num_in_flight < 2:
                await asyncio.sleep(0.01)
            server.handle_exit(signal.SIGTERM, None)
            refused = await client.post("/v1/completions", json=BODY)
            results = (await short, await long_, refused)
        await asyncio.wait_for(serving, 10)
        return results

    try:
        short, long_, refused = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert short.json()["choices"][0]["finish_reason"] == "length"
    assert long_.json()["choices"][0]["finish_reason"] == "abort"  # 400 steps of 20 ms outlast the 0.6 s drain
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert server.exit_code == 0 and not server._captured_signals  # nothing re-raised: the exit stays 0


def test_lifecycle_flags():
    args = make_arg_parser().parse_args(["--health-stall-timeout", "5", "--shutdown-timeout", "0",
                                         "--no-exit-on-engine-death"])
    assert (args.health_stall_timeout, args.shutdown_timeout, args.exit_on_engine_death) == (5.0, 0.0, False)
    defaults = make_arg_parser().parse_args([])
    assert (defaults.health_stall_timeout, defaults.shutdown_timeout, defaults.exit_on_engine_death) == (
        60.0, 30.0, True)
    with pytest.raises(SystemExit):
        make_arg_parser().parse_args(["--health-stall-timeout", "0"])


# ---- SIGTERM against the real server ----------------------------------------------------------------------
def _stream_reader(base: str, body: dict, result: dict) -> None:
    """Read a whole SSE stream; ``result`` gets the finish reason and whether [DONE] came."""
    try:
        request = {"model": MODEL, **body, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=request, timeout=60) as r:
            result["started"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    for choice in json.loads(line[6:]).get("choices", []):
                        result["finish_reason"] = choice.get("finish_reason") or result.get("finish_reason")
    except httpx.HTTPError as e:
        result["error"] = repr(e)


def _stalled_reader(base: str) -> socket.socket:
    """A client that sends a long streaming request and never reads the response."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"model": MODEL, "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "stream": True,
                       "logprobs": 5})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    return sock


def test_sigterm_drains_streams_aborts_the_rest_and_exits_0(tmp_path: Path):
    proc, base = start_server(tmp_path / "server.log", "--max-model-len", "512", "--shutdown-timeout", "4")
    short, long_ = {}, {}
    readers = [threading.Thread(target=_stream_reader, args=(base, {"prompt": "Hello", "max_tokens": 16,
                                                                    "ignore_eos": True}, short)),
               threading.Thread(target=_stream_reader, args=(base, {"prompt": "Once upon a time", "max_tokens": 480,
                                                                    "ignore_eos": True}, long_))]
    stalled = _stalled_reader(base)
    try:
        for t in readers:
            t.start()
        deadline = time.monotonic() + 30
        while not (short.get("started") and long_.get("started")) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{base}/v1/completions", json={**BODY, "model": MODEL}, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        code = proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.kill()
        for t in readers:
            t.join(30)
    log = (tmp_path / "server.log").read_text()
    print(f"\nsigterm: exit {code} after {took:.1f} s; short {short}; long {long_}")
    assert code == 0, log[-3000:]
    assert took < 4 + 3 + 5, f"exit took {took:.1f} s"  # drain timeout + grace + slack
    assert short.get("done") and short.get("finish_reason") == "length", short  # drained to its end
    assert long_.get("done") and long_.get("finish_reason") in ("abort", "length"), long_
    assert "Traceback" not in log, log[-3000:]

"""``pagedllm bench serve``: N concurrent streaming clients against an OpenAI-compatible server.

    workers (N coroutines) ── POST /v1/completions {prompt: token ids, max_tokens, ignore_eos,
                              stream, stream_options.include_usage} ──► server
        per request: start, the arrival of every chunk with text (TTFT, ITL), usage.completion_tokens, end

With ``launch_server`` the benchmark starts ``pagedllm serve`` itself on a free
loopback port (and stops it after), so one call can compare the server with the
same load offline through ``LLM.generate`` (``--compare-offline``): the ratio of
the two output tok/s is measured on one machine in one run, however busy it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from pagedllm.bench.datasets import BenchRequest
from pagedllm.bench.metrics import RequestTiming, ServeResult, serve_result


async def _one(client, url: str, body: dict, timing: RequestTiming) -> None:  # noqa: ANN001 - httpx client
    chunks = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            timing.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if "error" in event:
                timing.error = str(event["error"])[:200]
                return
            if event.get("usage"):
                timing.output_tokens = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            # A chunk with text is a token arrival; so is one with logprobs (a server started with
            # --skip-tokenizer-init streams a token only with them: its text stays empty).
            if choices and (choices[0].get("text") or choices[0].get("logprobs")):
                timing.token_times.append(now)
                chunks += 1
    timing.output_tokens = timing.output_tokens or chunks


async def run_load(base_url: str, requests: list[BenchRequest], concurrency: int, model: str | None = None,
                   api_key: str | None = None, progress: bool = True, logprobs: int | None = None) -> ServeResult:
    """Send every request, at most ``concurrency`` at once, each as soon as a slot frees; summarize."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits, headers=headers) as client:
        if model is None:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        timings: list[RequestTiming] = []
        bar = tqdm(total=len(requests), desc=f"serve, {concurrency} clients", disable=not progress)

        async def worker() -> None:
            while not queue.empty():
                r = queue.get_nowait()
                body = {"model": model, "prompt": r.prompt_token_ids, "max_tokens": r.output_len,
                        "temperature": 0.0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                if logprobs is not None:
                    body["logprobs"] = logprobs
                timing = RequestTiming(time.perf_counter(), len(r.prompt_token_ids))
                timings.append(timing)
                try:
                    await _one(client, "/v1/completions", body, timing)
                except httpx.HTTPError as e:
                    timing.error = repr(e)[:200]
                timing.end = time.perf_counter()
                bar.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        duration = time.perf_counter() - t0
        bar.close()
    return serve_result(timings, duration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(server_args: list[str], timeout: float = 900.0, log: str | None = None) -> Iterator[str]:
    """``pagedllm serve *server_args`` on a free loopback port; yields its base URL once /health is 200."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.server.api_server", *server_args, "--host", "127.0.0.1",
           "--port", str(port), "--uvicorn-log-level", "warning"]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} while starting"
                                   + (f" (log: {log})" if log else " (pass --server-log to see why)"))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy after {timeout:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()


def warm_up_server(base_url: str, requests: list[BenchRequest], api_key: str | None = None) -> None:
    """A few short requests before the timed load (first-call costs stay out of it)."""
    sample = [BenchRequest(r.prompt_token_ids, 2) for r in requests[:4]]
    asyncio.run(run_load(base_url, sample, len(sample), api_key=api_key, progress=False))

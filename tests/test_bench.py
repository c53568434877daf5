"""``pagedllm bench``: datasets, percentiles, the roofline arithmetic, offline runs on a tiny dummy Llama,
and the serve client against a scripted SSE server on loopback (exact timings, failures counted)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.bench import datasets
from pagedllm.bench.cli import main as bench_main
from pagedllm.bench.cli import make_parser
from pagedllm.bench.metrics import RequestTiming, percentile, serve_result
from pagedllm.bench.roofline import bound_seconds, model_costs


def test_random_dataset_is_seeded_and_within_the_range() -> None:
    a = datasets.random_requests(50, 100, 20, vocab_size=1000, range_ratio=0.5, seed=3)
    assert a == datasets.random_requests(50, 100, 20, vocab_size=1000, range_ratio=0.5, seed=3)
    assert a != datasets.random_requests(50, 100, 20, vocab_size=1000, range_ratio=0.5, seed=4)
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 10 <= r.output_len <= 30 for r in a)
    assert all(100 <= t < 1000 for r in a for t in r.prompt_token_ids)  # special ids left alone
    assert {len(r.prompt_token_ids) for r in datasets.random_requests(5, 7, 3, 1000)} == {7}
    with pytest.raises(ValueError, match="range-ratio"):
        datasets.random_requests(1, 10, 10, 1000, range_ratio=1.0)


def test_file_dataset_reads_lengths_and_text_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt_len": 5, "output_len": 3}\n\n{"prompt": "ab", "output_len": 2}\n')
    reqs = datasets.file_requests(path, 1000, tokenize=lambda s: [ord(c) for c in s])
    assert [(len(r.prompt_token_ids), r.output_len) for r in reqs] == [(5, 3), (2, 2)]
    assert reqs[1].prompt_token_ids == [97, 98]
    path.write_text('{"prompt_len": 5, "output_len": 3}\n{"prompt_len": 5}\n')
    with pytest.raises(ValueError, match="d.jsonl:2"):
        datasets.file_requests(path, 1000)


def test_mix256_prompts_are_the_gpu_benchmarks() -> None:
    prompts = datasets.mix256_prompts(128256)
    assert len(prompts) == 256 and all(100 <= len(p) <= 1024 for p in prompts)
    assert sum(map(len, prompts)) == 144_831  # the same ids as bench_gpu.py drew before the move


def test_percentiles_interpolate_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5 and percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_serve_result_definitions() -> None:
    ok = RequestTiming(10.0, 7, [10.5, 10.6, 10.9], output_tokens=3, end=11.0)
    failed = RequestTiming(10.0, 9, error="HTTP 429")
    r = serve_result([ok, failed], duration_s=2.0)
    assert (r.num_requests, r.num_failed, r.input_tokens, r.output_tokens) == (2, 1, 7, 3)
    assert r.ttft_ms["p50"] == pytest.approx(500) and r.tpot_ms["mean"] == pytest.approx(250)
    assert r.itl_ms["p50"] == pytest.approx(200) and r.itl_ms["p99"] == pytest.approx(298)
    assert r.output_throughput == 1.5 and r.request_throughput == 0.5 and r.first_error == "HTTP 429"


def test_roofline_bound_of_a_decode_only_workload() -> None:
    cfg = json.loads((Path(__file__).parents[1] / "benchmarks/configs/llama-3-8b/config.json").read_text())
    costs = model_costs(cfg)
    # Llama-3-8B has 8.03e9 parameters; a decode step reads all but the embedding table (a lookup).
    assert costs["weight_bytes"] == pytest.approx(2 * (8.03e9 - 128256 * 4096), rel=0.01)
    b = bound_seconds([1], 11, costs, bw=1e12, rate=1e15)
    # 10 decode steps, each reading the weights once plus a few KV tokens.
    assert b["decode_s"] == pytest.approx(10 * costs["weight_bytes"] / 1e12, rel=1e-3)
    mixed = bound_seconds([1, 1], [11, 2], costs, bw=1e12, rate=1e15)
    assert mixed["decode_s"] == pytest.approx(b["decode_s"], rel=1e-3)  # the short request leaves after 1 step


# ---- the serve client against a scripted server -------------------------------------------------
def _scripted_app(gaps: list[float]):
    """Streams one text chunk per gap (after sleeping it), then usage; prompt [0] gets a 429."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": [{"id": "scripted"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body["prompt"] == [0]:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429)
        assert body["stream"] and body["ignore_eos"] and body["model"] == "scripted"

        async def events():
            for gap in gaps:
                await asyncio.sleep(gap)
                yield f"data: {json.dumps({'choices': [{'text': 'x', 'index': 0}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(gaps)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture()
def scripted_server():
    import uvicorn

    from pagedllm.bench.serve import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_scripted_app([0.2, 0.1, 0.1]), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_serve_client_measures_ttft_itl_and_counts_failures(scripted_server: str) -> None:
    from pagedllm.bench.serve import run_load

    reqs = [datasets.BenchRequest([1, 2, 3], 3) for _ in range(8)] + [datasets.BenchRequest([0], 3)]
    r = asyncio.run(run_load(scripted_server, reqs, concurrency=4, progress=False))
    assert (r.num_requests, r.num_failed, r.output_tokens, r.input_tokens) == (9, 1, 24, 24)
    assert "429" in r.first_error
    assert 190 <= r.ttft_ms["p50"] < 400 and 90 <= r.itl_ms["p50"] < 250
    # 8 requests of ~0.4 s, 4 at a time: two waves.
    assert 0.75 <= r.duration_s < 2.5, r.duration_s


# ---- offline, on a tiny dummy Llama -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    cfg = json.loads((Path(__file__).parents[1] / "benchmarks/configs/llama-3-8b/config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=512, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_throughput_and_latency_commands(tiny_config: str, tmp_path: Path, capsys) -> None:
    engine = ["--model", tiny_config, "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "256",
              "--dtype", "float32"]
    out = tmp_path / "t.json"
    bench_main(["throughput", *engine, "--num-prompts", "6", "--input-len", "16", "--output-len", "5",
                "--no-progress", "--json", str(out), "--roofline"])
    result = json.loads(out.read_text())
    assert result["num_requests"] == 6 and result["output_tokens"] == 30  # EOS ignored: every token generated
    assert result["output_throughput"] == pytest.approx(30 / result["elapsed_s"])
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "roofline: skipped" in printed  # no GPU here
    bench_main(["latency", *engine, "--batch-size", "1,3", "--input-len", "8", "--output-len", "4", "--num-iters",
                "2", "--no-progress", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["batch_size"] for r in runs] == [1, 3]
    assert all(0 < r["ttft_ms"]["p50"] <= r["latency_ms"]["p50"] for r in runs)


def test_bad_options_are_messages_not_tracebacks(tiny_config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main(["throughput", "--model", tiny_config, "--load-format", "dummy", "--skip-tokenizer-init",
                    "--range-ratio", "2"])
    assert exc.value.code == 2 and "range-ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--launch", "--concurrency", "0"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve"])  # a server to talk to is required


def test_server_args_with_server_only_options() -> None:
    """--server-args holds the server's own options too: their values are not taken for the model."""
    from pagedllm.bench.cli import _server_engine_args

    args = _server_engine_args(["--api-server-count", "2", "--port", "9", "--max-model-len", "256"])
    assert args.model is None and args.max_model_len == 256
    args = _server_engine_args(["some/model", "--api-server-count", "2"])
    assert args.model == "some/model"

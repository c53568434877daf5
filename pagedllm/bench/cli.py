"""``pagedllm bench throughput|latency|serve``: arguments, runs, and the printed report.

    pagedllm bench throughput [engine options] [--dataset random|mix256|FILE] [--num-prompts 64]
    pagedllm bench latency [engine options] [--batch-size 1[,8,...]] [--input-len] [--output-len]
    pagedllm bench serve (--base-url URL | --launch) [--server-args "..."] [--concurrency 64[,...]]
                         [--compare-offline]
    common: --roofline (bound and fraction on a GPU), --plot out.png (serve, latency), --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import sys
from typing import Any

from pagedllm.bench import datasets
from pagedllm.bench.metrics import ServeResult
from pagedllm.config import EngineArgs


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="random", help="random, mix256, or a JSONL file of {prompt_len|prompt, "
                                                       "output_len} (default random)")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--range-ratio", type=float, default=0.0, help="random lengths spread +-this fraction")
    g.add_argument("--dataset-seed", type=int, default=0)


def _common_args(p: argparse.ArgumentParser, plot: bool) -> None:
    p.add_argument("--roofline", action="store_true", help="print each workload's bound and fraction (GPU)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if plot:
        p.add_argument("--plot", default=None, help="draw the curves to this PNG (pip install 'pagedllm[plot]')")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm bench", description="Benchmark pagedllm.")
    sub = parser.add_subparsers(dest="bench", required=True)
    thr = sub.add_parser("throughput", help="offline: the whole dataset through LLM.generate")
    EngineArgs.add_cli_args(thr)
    _dataset_args(thr)
    _common_args(thr, plot=False)
    lat = sub.add_parser("latency", help="offline: one batch end to end, repeated (TTFT, TPOT, latency)")
    EngineArgs.add_cli_args(lat)
    lat.add_argument("--batch-size", type=_int_list, default=[1], help="one size or a sweep: 1,8,32")
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    _common_args(lat, plot=True)
    srv = sub.add_parser("serve", help="online: concurrent streaming clients against a server")
    where = srv.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", action="store_true", help="start `pagedllm serve --server-args` here")
    srv.add_argument("--server-args", default="", help="the server's options (also the offline run's engine "
                                                       "options and the model whose vocabulary prompts use)")
    srv.add_argument("--server-log", default=None, help="with --launch: the server's log file")
    srv.add_argument("--concurrency", type=_int_list, default=[64], help="clients at once; a sweep: 1,8,64")
    srv.add_argument("--compare-offline", action="store_true",
                     help="with --launch: run the same load through LLM.generate after, and print the ratio")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--logprobs", type=int, default=None,
                     help="ask for logprobs; 0 makes a server without a tokenizer (--skip-tokenizer-init) stream "
                          "every token, which TTFT and ITL need")
    _dataset_args(srv)
    _common_args(srv, plot=True)
    return parser


def _requests(ns: argparse.Namespace, vocab_size: int, tokenize: Any = None) -> list[datasets.BenchRequest]:
    if ns.dataset == "random":
        return datasets.random_requests(ns.num_prompts, ns.input_len, ns.output_len, vocab_size, ns.range_ratio,
                                        ns.dataset_seed)
    if ns.dataset == "mix256":
        prompts = datasets.mix256_prompts(vocab_size, num=ns.num_prompts, seed=ns.dataset_seed)
        return [datasets.BenchRequest(p, ns.output_len) for p in prompts]
    return datasets.file_requests(ns.dataset, vocab_size, tokenize, ns.num_prompts, ns.dataset_seed)


def _make_llm(args: EngineArgs) -> Any:
    from pagedllm.engine.llm import LLM

    return LLM(**{k: v for k, v in dataclasses.asdict(args).items() if k != "extra"})


def _device(ns: argparse.Namespace) -> dict | None:
    if not ns.roofline:
        return None
    from pagedllm.bench.roofline import measure_device

    try:
        return measure_device()
    except (RuntimeError, ImportError) as e:
        print(f"roofline: skipped ({e})")
        return None


def _print_roofline(name: str, elapsed: float, requests: list, model_path: str | None, device: dict | None) -> None:
    if device is None:
        return
    from pagedllm.bench.roofline import load_config, roofline_line

    try:
        cfg = load_config(str(model_path))
    except (OSError, ValueError) as e:
        print(f"roofline {name}: skipped (no config.json for {model_path}: {e})")
        return
    print(roofline_line(name, elapsed, [len(r.prompt_token_ids) for r in requests],
                        [r.output_len for r in requests], cfg, device))


def _write_json(path: str | None, result: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=lambda o: dataclasses.asdict(o))


def _throughput(ns: argparse.Namespace) -> dict:
    from pagedllm.bench.offline import throughput

    llm = _make_llm(EngineArgs.from_cli_args(ns))
    mc = llm.engine.model_config
    requests = _requests(ns, mc.hf_config.vocab_size, llm.engine.tokenize)
    result = throughput(llm, requests, progress=not ns.no_progress)
    print(f"Throughput: {result['request_throughput']:.2f} requests/s, {result['total_throughput']:.1f} total "
          f"tokens/s, {result['output_throughput']:.1f} output tokens/s ({result['num_requests']} requests, "
          f"{result['elapsed_s']:.2f} s)")
    del llm  # free the device before measuring it
    _print_roofline("throughput", result["elapsed_s"], requests, mc.model, _device(ns))
    return result


def _latency(ns: argparse.Namespace) -> dict:
    from pagedllm.bench.offline import latency

    llm = _make_llm(EngineArgs.from_cli_args(ns))
    mc = llm.engine.model_config
    rows = []
    for bs in ns.batch_size:
        ns_bs = argparse.Namespace(**{**vars(ns), "dataset": "random", "num_prompts": bs, "range_ratio": 0.0,
                                      "dataset_seed": 0})
        requests = _requests(ns_bs, mc.hf_config.vocab_size)
        r = latency(llm, requests, ns.num_iters, ns.num_iters_warmup, progress=not ns.no_progress)
        r["requests"] = requests
        rows.append(r)
        print(f"batch {bs}: latency p50 {r['latency_ms']['p50']:.1f} ms (p90 {r['latency_ms']['p90']:.1f}, p99 "
              f"{r['latency_ms']['p99']:.1f}); TTFT p50 {r['ttft_ms']['p50']:.1f} ms; TPOT p50 "
              f"{r['tpot_ms']['p50']:.2f} ms")
    del llm
    device = _device(ns)
    for r in rows:
        _print_roofline(f"latency batch {r['batch_size']}", r["latency_ms"]["p50"] / 1e3, r.pop("requests"),
                        mc.model, device)
    if getattr(ns, "plot", None):
        from pagedllm.bench.plot import plot_latency

        plot_latency(rows, ns.plot)
    return {"runs": rows}


def print_serve_result(r: ServeResult, title: str) -> None:
    print(f"{'=' * 12} {title} {'=' * 12}")
    print(f"Successful requests:             {r.num_requests - r.num_failed} (failed {r.num_failed})")
    if r.first_error:
        print(f"First failure:                   {r.first_error}")
    print(f"Benchmark duration (s):          {r.duration_s:.2f}")
    print(f"Total input / output tokens:     {r.input_tokens} / {r.output_tokens}")
    print(f"Request throughput (req/s):      {r.request_throughput:.2f}")
    print(f"Output token throughput (tok/s): {r.output_throughput:.1f}")
    for name, s in (("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("ITL", r.itl_ms), ("E2E", r.e2e_ms)):
        print(f"{name + ' (ms)':<10} mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p90 {s['p90']:9.2f}  "
              f"p99 {s['p99']:9.2f}")


def _serve(ns: argparse.Namespace) -> dict:
    from pagedllm.bench.serve import launch_server, run_load, warm_up_server

    if ns.compare_offline and not ns.launch:
        raise ValueError("--compare-offline needs --launch (the offline run needs the server's device)")
    server_argv = shlex.split(ns.server_args)
    engine_args = _server_engine_args(server_argv)
    from pagedllm.engine.core_client import FrontEndModel

    model = FrontEndModel(engine_args)
    from pagedllm.loader import resolve_model_source

    resolve_model_source(model.model_config)  # the vocabulary size, without an engine to ask
    requests = _requests(ns, model.model_config.hf_config.vocab_size, model.tokenize if model.tokenizer else None)
    results: list[ServeResult] = []

    def load(base: str) -> None:
        warm_up_server(base, requests, ns.api_key)
        for c in ns.concurrency:
            r = asyncio.run(run_load(base, requests, c, api_key=ns.api_key, progress=not ns.no_progress,
                                     logprobs=ns.logprobs))
            print_serve_result(r, f"serve, {c} concurrent clients")
            results.append(r)

    if ns.launch:
        with launch_server(server_argv, log=ns.server_log) as base:
            load(base)
    else:
        load(ns.base_url)
    out: dict[str, Any] = {"serve": [dataclasses.asdict(r) | {"concurrency": c, "output_throughput":
                                     r.output_throughput, "request_throughput": r.request_throughput}
                                     for c, r in zip(ns.concurrency, results)]}
    if ns.compare_offline:
        from pagedllm.bench.offline import throughput

        offline = throughput(_make_llm(engine_args), requests, progress=not ns.no_progress, logprobs=ns.logprobs)
        out["offline"] = offline
        for c, r in zip(ns.concurrency, results):
            ratio = r.output_throughput / offline["output_throughput"]
            print(f"serve ({c} clients) / offline output tok/s: {r.output_throughput:.1f} / "
                  f"{offline['output_throughput']:.1f} = {100 * ratio:.1f}%")
    device = _device(ns)
    for c, r in zip(ns.concurrency, results):
        _print_roofline(f"serve {c} clients", r.duration_s, requests, model.model_config.model, device)
    if getattr(ns, "plot", None):
        from pagedllm.bench.plot import plot_serve

        plot_serve(list(zip(ns.concurrency, results)), ns.plot)
    return out


def _server_engine_args(server_argv: list[str]) -> EngineArgs:
    """The engine options inside --server-args, parsed with the server's own parser (so that a server
    option's value, e.g. ``--api-server-count 2``, is not taken for the model)."""
    from pagedllm.server.api_server import parse_serve_args

    return EngineArgs.from_cli_args(parse_serve_args(server_argv))


def main(argv: list[str] | None = None) -> None:
    ns = make_parser().parse_args(argv)
    try:
        if ns.bench == "throughput":
            result = _throughput(ns)
        elif ns.bench == "latency":
            result = _latency(ns)
        else:
            result = _serve(ns)
    except ValueError as e:  # bad option values: a message, not a traceback
        print(f"pagedllm bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    _write_json(ns.json, result)


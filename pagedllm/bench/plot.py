"""``--plot out.png``: throughput and latency curves (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

from typing import Any

from pagedllm.bench.metrics import ServeResult


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'pagedllm[plot]'") from None
    return plt


def plot_serve(rows: list[tuple[int, ServeResult]], path: str) -> None:
    """Output tok/s, and TTFT / ITL percentiles, against the number of concurrent clients."""
    plt = _pyplot()
    xs = [c for c, _ in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [r.output_throughput for _, r in rows], "o-")
    ax1.set(xlabel="concurrent clients", ylabel="output tok/s", title="throughput")
    for key, style in (("p50", "o-"), ("p99", "s--")):
        ax2.plot(xs, [r.ttft_ms[key] for _, r in rows], style, label=f"TTFT {key}")
        ax2.plot(xs, [r.itl_ms[key] for _, r in rows], style, label=f"ITL {key}")
    ax2.set(xlabel="concurrent clients", ylabel="ms", title="latency", yscale="log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def plot_latency(rows: list[dict], path: str) -> None:
    """End-to-end latency and TPOT against the batch size."""
    plt = _pyplot()
    xs = [r["batch_size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [r["latency_ms"]["p50"] for r in rows], "o-", label="p50")
    ax1.plot(xs, [r["latency_ms"]["p99"] for r in rows], "s--", label="p99")
    ax1.set(xlabel="batch size", ylabel="ms", title="batch latency")
    ax1.legend()
    ax2.plot(xs, [r["tpot_ms"]["p50"] for r in rows], "o-")
    ax2.set(xlabel="batch size", ylabel="ms per output token", title="TPOT p50")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")

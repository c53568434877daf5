"""``pagedllm bench``: throughput and latency offline through ``LLM``, serve against a running server.

    datasets.py   what to send: random lengths, the mix256 shape, or a JSONL file
    metrics.py    percentiles and the serve summary (request/s, output tok/s, TTFT, TPOT, ITL)
    roofline.py   a workload's bound on a GPU (weights + KV bytes over bandwidth, prefill FLOPs over the
                  matmul rate) and the card's measured bandwidth and rate
    offline.py    throughput and latency through LLM
    serve.py      N concurrent streaming clients over HTTP; optionally starts the server and runs the
                  same load offline in the same call (--compare-offline)
    cli.py        the argument parser and the printed report; plot.py draws --plot (matplotlib, optional)
"""

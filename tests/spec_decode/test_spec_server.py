"""`pagedllm serve --speculative-config JSON` on the real server: responses, metrics, and a bad config refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from tests.server.launch import running_server

CODE = ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
        "# The same two functions again:\ndef add(a, b):\n")


def test_serve_with_ngram_speculation_reports_spec_metrics(tmp_path: Path) -> None:
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                       "prompt_lookup_min": 1})
    with running_server(tmp_path / "server.log", "--max-model-len", "512", "--speculative-config", spec) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        whole = client.completions.create(model=model, prompt=CODE, max_tokens=16, temperature=0)
        assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=CODE, max_tokens=16, temperature=0, stream=True) if c.choices)
        assert streamed == whole.choices[0].text
        metrics = httpx.get(f"{base}/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("pagedllm:spec_decode") and "_created" not in line and "per_pos" not in line}
    assert values["pagedllm:spec_decode_num_drafts_total"] > 0
    assert 0 < values["pagedllm:spec_decode_num_accepted_tokens_total"] <= values[
        "pagedllm:spec_decode_num_draft_tokens_total"]
    assert f'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="{model}",position="0"}}' in metrics


def test_bad_speculative_config_is_a_usage_error() -> None:
    for bad, words in (('{"num_speculative_tokens": 0}', "num_speculative_tokens must be >= 1"),
                       ('{"num_speculative_tokens": 2, "lookup": 3}', "unknown keys ['lookup']"),
                       ("[4]", "must be a JSON object")):
        proc = subprocess.run([sys.executable, "-m", "pagedllm.server.api_server", "--speculative-config", bad],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "--speculative-config" in proc.stderr and words in proc.stderr

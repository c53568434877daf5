"""Benchmark datasets: a list of ``BenchRequest`` (prompt token ids, output length).

    random   prompt and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]
    mix256   prompt lengths uniform in [100, 1024] (seed 0), the GPU benchmark's workload
    FILE     JSONL, one request a line: {"prompt_len": 512, "output_len": 128} or {"prompt": "text",
             "output_len": 128} (text is tokenized with the model's tokenizer)

Prompts are random token ids (seeded), so no tokenizer or download is needed and
the prefix cache finds nothing to share, as with vLLM's random dataset.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def _random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # Ids above 100 leave special tokens (BOS/EOS/padding sit at the start of most vocabularies) alone.
    lo = min(100, vocab_size - 1)
    return [rng.randrange(lo, vocab_size) for _ in range(n)]


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[BenchRequest]:
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num-prompts, input-len and output-len must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [BenchRequest(_random_ids(rng, length(input_len), vocab_size), length(output_len)) for _ in range(num)]


def mix256_prompts(vocab_size: int, num: int = 256, lo: int = 100, hi: int = 1024, seed: int = 0) -> list[list[int]]:
    """The mix256 prompts (the GPU benchmark's workload; the same ids as before it moved here)."""
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(num)]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


def file_requests(path: str | Path, vocab_size: int, tokenize: Callable[[str], list[int]] | None = None,
                  num: int | None = None, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            output_len = int(row["output_len"])
            if "prompt" in row:
                if tokenize is None:
                    raise ValueError("text prompts need the model's tokenizer")
                ids = tokenize(row["prompt"])
            else:
                ids = _random_ids(rng, int(row["prompt_len"]), vocab_size)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected {{'prompt_len' or 'prompt', 'output_len'}}: {e}") from e
        if output_len < 1 or not ids:
            raise ValueError(f"{path}:{lineno}: output_len and the prompt must be non-empty")
        out.append(BenchRequest(ids, output_len))
        if num is not None and len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out

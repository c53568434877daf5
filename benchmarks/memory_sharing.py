"""KV memory saved by sharing blocks: parallel sampling (n=4) and beam search (width 4), against the
same work done as separate requests. The default model on the CPU (block counts do not depend on the device).

Prefix caching is off, so the only sharing is the fork (ref-counted blocks, copy-on-write of the
partly filled last block), as in the PagedAttention paper's measurement.

    .venv/bin/python benchmarks/memory_sharing.py
"""

from __future__ import annotations

import random
import subprocess

from pagedllm import LLM, BeamSearchParams, SamplingParams

WORDS = ("the quick brown fox jumps over a lazy dog while seven robots discuss rivers mountains tea and the "
         "long history of small villages by the sea").split()


def prompts(num: int = 8, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) for _ in range(num)]


def run(llm: LLM, add) -> tuple[int, float]:
    """Peak and step-averaged blocks in use while the requests added by `add` run."""
    eng, kv = llm.engine, llm.engine.scheduler.kv_cache_manager
    add(eng)
    used = []
    while eng.has_unfinished_requests():
        eng.step()
        used.append(kv.num_blocks - kv.block_pool.get_num_free_blocks())
    return max(used), sum(used) / len(used)


def main() -> None:
    llm = LLM(device="cpu", max_model_len=1024, block_size=16, enable_prefix_caching=False)
    ps = prompts()
    rows = []
    n, out_len = 4, 64
    par = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=out_len, ignore_eos=True)
    one = SamplingParams(temperature=1.0, seed=0, max_tokens=out_len, ignore_eos=True)
    shared = run(llm, lambda e: [e.add_request(f"p{i}", p, par) for i, p in enumerate(ps)])
    separate = run(llm, lambda e: [e.add_request(f"s{i}-{k}", p, one) for i, p in enumerate(ps) for k in range(n)])
    rows.append(("parallel sampling n=4, 64 tokens", shared, separate))
    width, beam_len = 4, 32
    beam = run(llm, lambda e: [e.add_beam_search_request(f"b{i}", p, BeamSearchParams(width, beam_len))
                               for i, p in enumerate(ps)])
    for i in range(len(ps)):
        llm.engine.beam_search.pop_output(f"b{i}")
    same = SamplingParams(temperature=0, max_tokens=beam_len, ignore_eos=True)
    beam_sep = run(llm, lambda e: [e.add_request(f"w{i}-{k}", p, same) for i, p in enumerate(ps) for k in range(width)])
    rows.append(("beam search width 4, 32 tokens", beam, beam_sep))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tok = llm.get_tokenizer()
    lens = [len(tok.encode(p)) for p in ps]
    print(f"commit {commit}; {len(ps)} prompts of {min(lens)}-{max(lens)} tokens; block size 16; prefix caching off")
    print("| workload | shared: peak / mean blocks | separate: peak / mean blocks | saving (peak / mean) |")
    print("|---|---|---|---|")
    for name, (sp, sm), (tp, tm) in rows:
        saving = f"{100 * (1 - sp / tp):.1f}% / {100 * (1 - sm / tm):.1f}%"
        print(f"| {name} | {sp} / {sm:.0f} | {tp} / {tm:.0f} | {saving} |")


if __name__ == "__main__":
    main()

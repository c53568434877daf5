"""Draft-model speculation on the CPU: the default model verifying drafts from its own first layers.

The draft is made here from the default model's GGUF: the first ``--draft-layers`` decoder layers with the
embedding, final norm and LM head (an "early exit" of the target, same vocabulary), saved as an HF checkpoint.
For each grounded and chat prompt (benchmarks/data/spec_*.json, chat template, greedy, batch 1) the plain and
the speculating engine run back to back; reported per set: ms per output token (decode phase), their ratio,
draft acceptance and tokens per target forward (accepted drafts + 1). Greedy outputs must match.

    PYTHONPATH=. python benchmarks/bench_draft_cpu.py [--draft-layers 6] [--k 3] [--max-tokens 96] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_draft(layers: int, out_dir: Path) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from pagedllm.config import ModelConfig
    from pagedllm.loader.gguf_loader import iter_gguf_weights
    from pagedllm.loader.resolve import resolve_model

    mc = ModelConfig(model=None, dtype="float32")
    resolve_model(mc, "cpu")
    cfg = mc.hf_config
    full = LlamaForCausalLM(cfg)
    names = [n for n, _ in full.named_parameters()]
    state = dict(iter_gguf_weights(mc.model, cfg, names))
    cfg.num_hidden_layers = layers
    draft = LlamaForCausalLM(cfg).eval()
    keep = {k: v for k, v in state.items() if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers}
    if cfg.tie_word_embeddings:
        keep.pop("lm_head.weight", None)
    missing, unexpected = draft.load_state_dict(keep, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        draft.tie_weights()
    draft.save_pretrained(out_dir)
    return str(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto", help="float32: exact (bf16 weights are not batch-invariant)")
    ns = ap.parse_args()
    from pagedllm import LLM, SamplingParams

    draft_dir = make_draft(ns.draft_layers, Path(tempfile.mkdtemp()) / "draft")
    plain = LLM(max_model_len=2048, dtype=ns.dtype)
    spec = LLM(max_model_len=2048, dtype=ns.dtype,
               speculative_config={"model": draft_dir, "num_speculative_tokens": ns.k})
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens)
    for name in ("grounded", "chat"):
        prompts = [p["prompt"] for p in json.loads((HERE / "data" / f"spec_{name}.json").read_text())]
        times = {"plain": [], "spec": []}
        same = 0
        stats0 = spec.engine.scheduler.spec_stats.num_draft_tokens, spec.engine.scheduler.spec_stats.num_accepted_tokens
        drafts0 = spec.engine.scheduler.spec_stats.num_drafts
        for i, prompt in enumerate(prompts):
            order = [("plain", plain), ("spec", spec)] if i % 2 == 0 else [("spec", spec), ("plain", plain)]
            texts = {}
            for label, llm in order:
                t0 = time.perf_counter()
                out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0].outputs[0]
                dt = time.perf_counter() - t0
                times[label].append(1000 * dt / max(len(out.token_ids), 1))
                texts[label] = out.token_ids
            same += texts["plain"] == texts["spec"]
        st = spec.engine.scheduler.spec_stats
        drafted, accepted = st.num_draft_tokens - stats0[0], st.num_accepted_tokens - stats0[1]
        verifications = st.num_drafts - drafts0
        p, s = statistics.mean(times["plain"]), statistics.mean(times["spec"])
        print(f"{name:9s} prompts {len(prompts):2d}  plain {p:6.1f} ms/token  draft-model {s:6.1f} ms/token  "
              f"ratio {s / p:.2f}  acceptance {accepted / max(drafted, 1):.2f}  tokens/target forward "
              f"{(accepted + verifications) / max(verifications, 1):.2f}  identical {same}/{len(prompts)}")


if __name__ == "__main__":
    main()

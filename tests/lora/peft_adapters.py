"""PEFT LoRA adapters built in the tests, with random weights of a trained adapter's magnitude, and
HF transformers + PEFT as the reference that runs them."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base: torch.nn.Module, path: Path | str, r: int, targets: list[str], seed: int,
                 rslora: bool = False, alpha: float | None = None, b_std: float = 0.1) -> str:
    """A PEFT LoRA adapter of ``base`` (an HF model; PEFT wraps it in place, so pass a throwaway copy)
    saved at ``path``: A ~ N(0, 1/in) as PEFT's Kaiming init draws it, B ~ N(0, b_std) (trained B
    is nonzero, PEFT's init is zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets,
                        use_rslora=rslora, init_lora_weights=False)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    model.save_pretrained(str(path))
    return str(path)


@torch.no_grad()
def peft_greedy(base: torch.nn.Module, adapter: str | None, prompts: list[list[int]], max_new_tokens: int,
                eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy continuations by HF ``generate`` on ``base`` with ``adapter`` applied through PEFT
    (None: the base model). ``base`` is modified in place by PEFT: pass a fresh model per adapter."""
    model = base
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, adapter).eval()
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0)
        outs.append(out[0, len(prompt):].tolist())
    return outs

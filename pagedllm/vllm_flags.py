"""`vllm serve` flags pagedllm has no feature behind yet, and ``--config`` YAML files.

A launch script written for vLLM should fail, if at all, on a feature, not on a
spelling. So every common ``vllm serve`` flag parses here:

- ``NO_EFFECT``: tuning knobs of vLLM's own machinery (multi-step scheduling, its
  async output processor, custom all-reduce ...) with nothing to tune here; accepted,
  and one info line says they changed nothing.
- ``NOT_SUPPORTED``: features not built yet. Their neutral value (the one that asks
  for nothing, e.g. ``--kv-cache-dtype auto``, ``--data-parallel-size 1``) passes;
  anything else stops start-up with one line: "--prompt-adapters is not supported yet".

Flags that other parts of pagedllm own (speculative decoding, tool calling,
structured output, logprobs limits, API server count) are not listed here.
"""

from __future__ import annotations

import argparse
from typing import Any

# flag -> (takes a value, neutral value). A flag without a value is neutral when absent.
NOT_SUPPORTED: dict[str, tuple[bool, Any]] = {
    "--prompt-adapters": (True, None),
    "--data-parallel-size": (True, "1"),
    "--cpu-offload-gb": (True, "0"),
    "--rope-scaling": (True, None), "--rope-theta": (True, None), "--hf-overrides": (True, None),
    "--tokenizer-mode": (True, "auto"), "--code-revision": (True, None), "--tokenizer-revision": (True, None),
    "--limit-mm-per-prompt": (True, None), "--mm-processor-kwargs": (True, None),
    "--enable-sleep-mode": (False, None), "--enable-expert-parallel": (False, None),
    "--kv-transfer-config": (True, None), "--compilation-config": (True, None),
    "--override-generation-config": (True, None), "--reasoning-parser": (True, None),
    "--enable-reasoning": (False, None), "--uds": (True, None), "--middleware": (True, None),
    "--response-role": (True, "assistant"), "--disable-fastapi-docs": (False, None),
    "--return-tokens-as-token-ids": (False, None), "--enable-prompt-tokens-details": (False, None),
    "--enable-request-id-headers": (False, None), "--otlp-traces-endpoint": (True, None),
    "--generation-config": (True, "auto"), "--ignore-patterns": (True, None),
    "--max-num-partial-prefills": (True, "1"), "--long-prefill-token-threshold": (True, "0"),
    "--num-lookahead-slots": (True, "0"), "--chat-template-content-format": (True, "auto"),
}
NO_EFFECT: dict[str, bool] = {  # flag -> takes a value
    "--disable-custom-all-reduce": False, "--disable-async-output-proc": False, "--use-v2-block-manager": False,
    "--disable-frontend-multiprocessing": False, "--num-scheduler-steps": True, "--multi-step-stream-outputs": True,
    "--scheduler-delay-factor": True, "--max-parallel-loading-workers": True, "--tokenizer-pool-size": True,
    "--max-seq-len-to-capture": True, "--enable-chunked-prefill": False, "--trust-remote-code": False,
    "--disable-log-stats-per-engine": False, "--ray-workers-use-nsight": False, "--worker-cls": True,
    "--model-impl": True, "--logits-processor-pattern": True, "--enable-server-load-tracking": False,
    "--enable-force-include-usage": False, "--disable-uvicorn-access-log": False,
}
_WHY_NO_EFFECT = {
    "--max-seq-len-to-capture": "CUDA graphs here cover decode batches at every length up to max_model_len",
    "--enable-chunked-prefill": "prefill is always chunked by --max-num-batched-tokens",
    "--trust-remote-code": "pagedllm runs its own model code, never a repository's",
}


def add_vllm_compat_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags above (in a help group of their own)."""
    group = parser.add_argument_group("vLLM flags without a pagedllm feature (accepted for launch scripts)")
    for flag, (takes_value, neutral) in NOT_SUPPORTED.items():
        group.add_argument(flag, **_spec(takes_value), default=None,
                           help="not supported yet" + (f" (only {neutral!r} is accepted)" if neutral else ""))
    for flag, takes_value in NO_EFFECT.items():
        group.add_argument(flag, **_spec(takes_value), default=None,
                           help="accepted; no effect here" + (f": {_WHY_NO_EFFECT[flag]}" if flag in _WHY_NO_EFFECT
                                                               else ""))
    # --no-enable-chunked-prefill asks to turn off what cannot be turned off.
    group.add_argument("--no-enable-chunked-prefill", dest="no_chunked_prefill", action="store_true",
                       help="not supported yet: prefill is always chunked")


def _spec(takes_value: bool) -> dict[str, Any]:
    # `nargs="?"` also takes vLLM's boolean `--flag true` spelling of flags without a value.
    return {} if takes_value else {"nargs": "?", "const": True}


def check_vllm_compat_args(ns: argparse.Namespace) -> list[str]:
    """ValueError naming the first unsupported feature asked for; else notes for the flags with no effect."""
    for flag, (_, neutral) in NOT_SUPPORTED.items():
        value = getattr(ns, _dest(flag))
        if value is not None and value is not False and str(value).lower() not in ("false", str(neutral).lower()):
            raise ValueError(f"{flag} is not supported yet by pagedllm")
    if ns.no_chunked_prefill:
        raise ValueError("--no-enable-chunked-prefill is not supported yet: pagedllm always chunks prefill")
    notes = []
    for flag in NO_EFFECT:
        if getattr(ns, _dest(flag)) is not None:
            why = _WHY_NO_EFFECT.get(flag, "nothing in pagedllm to tune")
            notes.append(f"{flag} has no effect: {why}")
    return notes


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def expand_config_file(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--config FILE`` (YAML of flag names without dashes) spliced in before ``argv``: the command line wins.

        # serve.yaml
        port: 8001
        max-model-len: 2048
        enable-prefix-caching: false
    """
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    return [*_yaml_to_argv(known.config, parser), *rest]


def _yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config: cannot read {path!r}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must be a YAML mapping of flag names to values")
    argv = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:  # the default of a plain switch; `--no-X` where the flag has one
            if "--no-" + flag[2:] in parser._option_string_actions:
                argv.append("--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv

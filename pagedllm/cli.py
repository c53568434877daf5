"""Command line: `pagedllm serve`, `pagedllm generate "prompt"`, `pagedllm chat`."""

from __future__ import annotations

import argparse
import sys

from pagedllm.config import EngineArgs


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed-sampling", type=int, default=None, help="seed for sampling")


def _sampling_params(ns: argparse.Namespace):  # noqa: ANN202
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                          seed=ns.seed_sampling)


def _generate(ns: argparse.Namespace) -> None:
    from pagedllm.engine.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**{k: v for k, v in vars(args).items() if k != "extra"})
    for out in llm.generate(ns.prompt, _sampling_params(ns), use_tqdm=False):
        print(out.outputs[0].text)


def _chat(ns: argparse.Namespace) -> None:
    """Interactive chat: each line is a user turn; the reply streams token by token."""
    import uuid

    from pagedllm.engine.chat_utils import apply_chat_template
    from pagedllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    params = _sampling_params(ns)
    history: list[dict] = []
    if ns.system:
        history.append({"role": "system", "content": ns.system})
    print("pagedllm chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        req_id = uuid.uuid4().hex
        engine.add_request(req_id, apply_chat_template(engine.tokenizer, history), params)
        shown = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                print(text[len(shown):], end="", flush=True)
                shown = text
        print()
        history.append({"role": "assistant", "content": shown})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --- bench (issue 10): `pagedllm bench throughput|latency|serve`, its own parser in pagedllm/bench ---
    if argv and argv[0] == "bench":
        from pagedllm.bench.cli import main as bench_main

        bench_main(argv[1:])
        return
    # --- end bench ---
    if argv and argv[0] == "serve":
        from pagedllm.server.api_server import main as serve_main

        serve_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="pagedllm")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="OpenAI-compatible server (see `pagedllm serve --help`)")
    gen = sub.add_parser("generate", help="complete a prompt")
    gen.add_argument("prompt")
    EngineArgs.add_cli_args(gen)
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat")
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat)
    _sampling_args(chat)
    ns = parser.parse_args(argv)
    try:
        {"generate": _generate, "chat": _chat}[ns.command](ns)
    except ValueError as e:  # bad option values: a message, not a traceback
        print(f"pagedllm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

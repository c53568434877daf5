"""Command line: `pagedllm serve`, `pagedllm generate "prompt"`, `pagedllm chat`, `pagedllm --version`.

Every subcommand fails the same way: one line ``pagedllm <command>: error: ...`` on
stderr and exit status 1 (argparse's usage errors keep status 2); ``--debug`` or
``PAGEDLLM_LOGGING_LEVEL=DEBUG`` adds the traceback. In ``chat``, Ctrl-C stops the
reply being written and returns to the prompt; Ctrl-C at the prompt, or Ctrl-D, quits.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
from collections.abc import Callable

from pagedllm import __version__
from pagedllm.config import EngineArgs


class _DeprecatedAlias(argparse.Action):
    """Stores under the new flag's dest and warns that ``option_string`` is going away."""

    def __init__(self, *args: object, new_name: str = "", **kwargs: object) -> None:
        self.new_name = new_name
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    group.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0: all")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    group.add_argument("--sampling-seed", type=int, default=None,
                       help="seed of the sampling random stream, for reproducible samples; "
                            "--seed seeds the engine")
    group.add_argument("--seed-sampling", dest="sampling_seed", type=int, action=_DeprecatedAlias,
                       new_name="--sampling-seed", help=argparse.SUPPRESS)


def _sampling_params(ns: argparse.Namespace):  # noqa: ANN202
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                          seed=ns.sampling_seed, ignore_eos=ns.ignore_eos)


def _generate(ns: argparse.Namespace) -> None:
    from pagedllm.engine.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    with LLM(**{k: v for k, v in vars(args).items() if k != "extra"}) as llm:
        for out in llm.generate(ns.prompt, _sampling_params(ns), use_tqdm=False):
            print(out.outputs[0].text)


def _chat(ns: argparse.Namespace) -> None:
    """Interactive chat: each line is a user turn; the reply streams token by token."""
    from pagedllm.engine.chat_utils import apply_chat_template
    from pagedllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    params = _sampling_params(ns)
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    print("pagedllm chat — Ctrl-C stops a reply; Ctrl-D, Ctrl-C or an empty line quits", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = _read_line("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
            print()
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        engine.add_request(f"chat-{turn}", apply_chat_template(engine.tokenizer, history), params)
        history.append({"role": "assistant", "content": _stream_reply(engine, f"chat-{turn}")})


def _read_line(prompt: str) -> str:
    """``input(prompt)`` that Ctrl-C always interrupts.

    A SIGINT may be delivered to any thread that does not block it (torch's pool, helpers); one that
    lands elsewhere never wakes a main thread blocked in ``input()``, and Ctrl-C at the prompt would
    hang. Waiting with a timeout lets the main thread run the handler (KeyboardInterrupt) within 0.1 s.
    """
    import select

    print(prompt, end="", flush=True)
    while not select.select([sys.stdin], [], [], 0.1)[0]:
        pass
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _stream_reply(engine, request_id: str) -> str:  # noqa: ANN001 - an LLMEngine
    """Print the reply as it grows; Ctrl-C aborts it between two steps and returns what was shown.

    SIGINT only sets a flag here: an interrupt inside a step could leave the scheduler
    and the model runner disagreeing about what was computed.
    """
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    shown = ""
    try:
        while engine.has_unfinished_requests():
            if interrupted:
                engine.abort_request(request_id)
                print(" [interrupted]", end="")
                break
            for out in engine.step():
                text = out.outputs[0].text
                print(text[len(shown):], end="", flush=True)
                shown = text
    finally:
        signal.signal(signal.SIGINT, previous)
        print(flush=True)
    return shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="LLM inference and serving with a paged KV cache.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pagedllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,chat}")
    sub.add_parser("serve", help="OpenAI-compatible server (see `pagedllm serve --help`)", add_help=False)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    gen = sub.add_parser("generate", help="complete a prompt and print the completion", formatter_class=fmt)
    gen.add_argument("prompt", help="the prompt text")
    chat = sub.add_parser("chat", help="interactive chat in the terminal, through the chat template",
                          formatter_class=fmt)
    chat.add_argument("--system", default=None, help="system prompt")
    for command in (gen, chat):
        EngineArgs.add_cli_args(command)
        _sampling_args(command)
        command.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


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
    ns = build_parser().parse_args(argv)
    run_command(f"pagedllm {ns.command}", {"generate": _generate, "chat": _chat}[ns.command], ns)


def run_command(prog: str, command: Callable[[argparse.Namespace], None], ns: argparse.Namespace) -> None:
    """Run ``command(ns)`` with logging set up; any failure becomes one line and exit status 1."""
    from pagedllm.logging_utils import configure_logging, exit_on_error

    debug = getattr(ns, "debug", False)
    try:
        configure_logging("debug" if debug else None)
        command(ns)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place a CLI error becomes a message
        exit_on_error(prog, e, debug)


if __name__ == "__main__":
    main()

"""xgrammar behind the few calls the manager makes: parse a spec, compile it, make matchers and bitmasks.

Only this module imports xgrammar, and only the manager imports this module, when the
first request with a grammar arrives: requests without one never load the library.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pagedllm.sampling_params import StructuredOutputsParams

# xgrammar's C++ errors start with "[12:00:00] /project/cpp/file.cc:123: "; the user needs what follows.
if TYPE_CHECKING:  # the API front end parses grammars here without importing torch
    import torch

_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")


class XgrammarBackend:
    """One tokenizer's grammar compiler. ``compile`` is thread-safe (xgrammar's compiler is)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        # vocab_size is the model's (its embedding may be larger than the tokenizer): the bitmask
        # covers every logit, and ids past the tokenizer are never allowed.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        # One thread per compile: the manager's pool already compiles several grammars at once.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def parse(self, params: StructuredOutputsParams) -> Any:
        """The spec as an xgrammar Grammar; ValueError naming the problem."""
        return parse_grammar(params)

    def compile(self, grammar: Any) -> Any:
        """A CompiledGrammar (the token-level automaton); the slow part, run on the grammar pool."""
        return self._compiler.compile_grammar(grammar)

    def matcher(self, compiled: Any) -> Any:
        """A fresh GrammarMatcher: the state of one sequence in the grammar."""
        return self._xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """(num_rows, ceil(vocab_size / 32)) int32 on the host, all tokens allowed."""
        return self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)


def parse_grammar(params: StructuredOutputsParams) -> Any:
    """``params`` as an xgrammar Grammar (fast, needs no tokenizer); ValueError naming the problem.

    The server calls it before a request reaches the engine, so the 400 can name the field the client sent.
    """
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
            # Compact JSON (", " and ": " separators): free whitespace lets a model pad forever.
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            # json.dumps writes each choice as a quoted string with the escapes EBNF reads.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        text = str(e).strip()
        message = _CPP_PREFIX.sub("", text).strip().splitlines()[0] if text else type(e).__name__
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {message}") from None

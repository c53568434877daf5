"""Incremental detokenization and stop strings: token ids in, text out, one step at a time.

The engine owns one ``IncrementalDetokenizer`` per sequence. Each step it hands
over the newly sampled token ids; the detokenizer renders only the text they
add (never re-decoding the whole output), checks the stop strings over the
window that text can affect, and keeps ``output_text``.

Rendering a token on its own is wrong in two ways, which is why this is not
``tokenizer.decode([id])`` per token:
- merging rules: a SentencePiece/BPE piece's leading space, or a decoder's
  ``Strip``, depends on what comes before it;
- byte fallback: ``<0xE2> <0x82> <0xAC>`` is one character ("€") split over three
  tokens; decoding a prefix of it yields U+FFFD, which must not reach the user.

Both are solved by decoding a short window of recent tokens twice, without and
with the new ones, and emitting the difference, holding back while the window
ends in U+FFFD (an incomplete UTF-8 sequence)::

    tokens:  ... | t[prefix_offset:read_offset] | t[read_offset:]
                   context, already emitted       new, not yet emitted
    emit:    decode(t[prefix_offset:]) minus decode(t[prefix_offset:read_offset])

Fast (Rust ``tokenizers``) tokenizers do this natively in ``DecodeStream`` (as
vLLM v1's FastIncrementalDetokenizer uses it); other tokenizers get the classic
prefix/read offset algorithm (vLLM's ``detokenize_incrementally``). Both start
from a few prompt tokens, so the first output token renders as a continuation
of the prompt (e.g. a SentencePiece "▁Paris" after "is" keeps its space).

Streaming and stop strings: a stop string is removed from the output, so text
that might be the start of one is held back from streaming (the last
``longest stop string - 1`` characters) until the request finishes; a client
never sees text that later disappears.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pagedllm.sampling_params import SamplingParams

try:  # tokenizers >= 0.21; transformers 5 requires newer, but degrade rather than fail.
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed tokenizers
    DecodeStream = None

_REPLACEMENT_CHAR = "\ufffd"
# DecodeStream raises this when a tokenizer's output is not monotonic in its input
# (vllm-project/vllm#17448); the stream is then restarted from the current token.
_INVALID_PREFIX_ERR = "Invalid prefix encountered"
# Prompt tokens that prime the stream: enough context for leading-space rules.
_CONTEXT_MIN_TOKENS = 4
_CONTEXT_MAX_TOKENS = 24
# An incomplete character at the end of a prompt spans at most 3 tokens (4-byte UTF-8, byte fallback).
_MAX_PARTIAL_CHAR_TOKENS = 3


class IncrementalDetokenizer:
    """Text of one sequence, rendered token by token, with stop string handling.

    ``update`` returns the stop string that ended the sequence (the text is then
    cut before it, or right after it with ``include_stop_str_in_output``); the
    caller finishes the sequence (tokens sent after that are ignored and the same
    stop string is returned again). A token id that ends
    generation (EOS, ``stop_token_ids``) should not be passed in unless its text
    belongs in the output.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.output_text = ""
        self.num_output_tokens = 0
        self.stop_str: str | None = None  # set once a stop string has matched

        skip = params.skip_special_tokens
        if getattr(tokenizer, "is_fast", False) and DecodeStream is not None:
            self._stream: _FastTokenStream | _OffsetTokenStream = _FastTokenStream(
                tokenizer, prompt_token_ids, skip)
        else:
            self._stream = _OffsetTokenStream(tokenizer, prompt_token_ids, skip)

        self._stop: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Characters held back from streaming: a partial stop string is at most one shorter than it.
        self._stop_hold_len = 0
        if self._stop and not self._include_stop:
            self._stop_hold_len = max(len(s) for s in self._stop) - 1
        self._num_sent_chars = 0  # how much of output_text get_next_output_text(delta=True) returned

        # Without spaces between special tokens, an added token that follows another renders as its
        # bare content (the decoder may prefix it with a space). Moot when they are skipped.
        self._added_tokens: dict[int, str] | None = None
        if not skip and not params.spaces_between_special_tokens:
            self._added_tokens = {tid: tok.content for tid, tok in tokenizer.added_tokens_decoder.items()}
        self._prev_was_added = False

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens (one or more per step); return the stop string they completed, if any.

        Tokens are rendered one at a time and the stop strings checked after each,
        so the first stop string to complete wins and later tokens are never rendered.
        """
        if self.stop_str is not None:
            return self.stop_str
        for token_id in new_token_ids:
            self.num_output_tokens += 1
            piece = self._decode_next(token_id)
            if not piece:
                continue
            prev_len = len(self.output_text)
            self.output_text += piece
            # min_tokens: stop strings do not count until that many tokens are out (vLLM semantics).
            if self._stop and self.num_output_tokens > self._min_tokens and self._check_stop(prev_len):
                return self.stop_str
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to send now: all of it, or (``delta``) only what was not sent before.

        Until the sequence finishes, the tail that could still turn out to be the
        start of a stop string is held back.
        """
        hold = 0 if finished or self.stop_str is not None else self._stop_hold_len
        length = max(len(self.output_text) - hold, 0)
        if not delta:
            return self.output_text[:length]
        if length <= self._num_sent_chars:
            return ""
        text = self.output_text[self._num_sent_chars:length]
        self._num_sent_chars = length
        return text

    def decode_token(self, token_id: int) -> str:
        """One token's own text (special tokens included), for ``Logprob.decoded_token``."""
        return self._stream.decode_one(token_id)

    def _decode_next(self, token_id: int) -> str:
        piece = self._stream.step(token_id)
        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and piece and self._prev_was_added:
                piece = content
            # Only a rendered added token counts: a held-back one would lose the text buffered before it.
            self._prev_was_added = content is not None and bool(piece)
        return piece

    def _check_stop(self, prev_len: int) -> bool:
        """Search the window the new text can affect; on a match, cut the text and record it.

        A stop string s newly present must end inside the new text, so it starts at or
        after ``prev_len - len(s) + 1``. Of several matches the one starting first wins.
        """
        best_start, best = -1, ""
        for stop in self._stop:
            start = self.output_text.find(stop, max(prev_len - len(stop) + 1, 0))
            if start != -1 and (best_start == -1 or (start, len(stop)) < (best_start, len(best))):
                best_start, best = start, stop
        if best_start == -1:
            return False
        end = best_start + len(best) if self._include_stop else best_start
        self.output_text = self.output_text[:end]
        self.stop_str = best
        return True


def _prompt_context(prompt_token_ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
    """The prompt tokens a stream starts from: a short tail of the prompt that decodes cleanly.

    They give the first output token its context (leading-space rules) but no
    characters of their own: a tail that starts mid-character is lengthened, and
    the tokens of an incomplete character at the very end of the prompt are left
    out, so its bytes never join the output text. Usually the first try is clean.
    """
    n = len(prompt_token_ids)
    for end in range(n, max(n - _MAX_PARTIAL_CHAR_TOKENS - 1, 0), -1):
        for start in range(max(end - _CONTEXT_MIN_TOKENS, 0), max(end - _CONTEXT_MAX_TOKENS, 0) - 1, -1):
            context = prompt_token_ids[start:end]
            if _REPLACEMENT_CHAR not in decode(context):
                return context
    return []  # no clean tail (e.g. the prompt holds U+FFFD itself): render without context


class _FastTokenStream:
    """Incremental decoding through the Rust tokenizer's ``DecodeStream``."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer.backend_tokenizer  # the tokenizers.Tokenizer underneath
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        decode = functools.partial(self._tokenizer.decode, skip_special_tokens=skip_special_tokens)
        for token_id in _prompt_context(prompt_token_ids, decode):
            self.step(token_id)

    def step(self, token_id: int) -> str:
        """Text that ``token_id`` completes; "" while it (with those before) is an incomplete character."""
        try:
            return self._stream.step(self._tokenizer, token_id) or ""
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX_ERR):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._tokenizer, token_id) or ""

    def decode_one(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


class _OffsetTokenStream:
    """The classic prefix/read offset algorithm, for tokenizers without ``DecodeStream``.

    Works on token strings (``convert_ids_to_tokens``) and renders windows with
    ``convert_tokens_to_string``, which is what ``decode`` does for these tokenizers.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._vocab_size = len(tokenizer)
        decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        # The prefix window must start on a character boundary (a byte-fallback decoder turns a whole
        # run of byte tokens into U+FFFD if it starts mid-character), so it is the whole clean context.
        self._tokens: list[str] = self._to_tokens(_prompt_context(prompt_token_ids, decode))
        self._prefix_offset, self._read_offset = 0, len(self._tokens)

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        # Ids past the tokenizer's vocabulary (padded embedding rows) render as nothing.
        valid = [t for t in token_ids if 0 <= t < self._vocab_size]
        tokens = self._tokenizer.convert_ids_to_tokens(valid, skip_special_tokens=self._skip)
        return [t or "" for t in tokens]

    def step(self, token_id: int) -> str:
        self._tokens.extend(self._to_tokens([token_id]))
        window = self._tokens[self._prefix_offset:]
        read = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.convert_tokens_to_string(window[:read])
        new_text = self._tokenizer.convert_tokens_to_string(window)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing yet, or an incomplete UTF-8 sequence at the end: wait for more
        # Slide the windows, and drop tokens no window will look at again so memory stays bounded.
        del self._tokens[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._tokens)
        return new_text[len(prefix_text):]

    def decode_one(self, token_id: int) -> str:
        if not 0 <= token_id < self._vocab_size:
            return ""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

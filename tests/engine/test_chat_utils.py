"""chat_utils.apply_chat_template with the real SmolLM2 tokenizer: ids as transformers makes them, validation."""

from __future__ import annotations

import pytest

from pagedllm.engine.chat_utils import apply_chat_template


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _hf_ids(tokenizer, messages) -> list[int]:
    """transformers' own tokenize=True path (a list in v4, a BatchEncoding in v5)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_ids_match_transformers(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye ☕"}]
    ids = apply_chat_template(tokenizer, messages)
    assert ids == _hf_ids(tokenizer, messages)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # generation prompt added


def test_text_parts_equal_a_string(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    plain = [{"role": "user", "content": "one\ntwo"}]
    assert apply_chat_template(tokenizer, parts) == apply_chat_template(tokenizer, plain)


@pytest.mark.parametrize(("messages", "match"), [
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role"),
    ([{"content": "x"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image_url"}]}],
     r"messages\[1\]\.content\[0\]"),
])
def test_bad_messages_raise_value_error_naming_the_field(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(tokenizer, messages)


def test_assistant_turn_without_content_is_allowed(tokenizer):
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])
    assert ids == _hf_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}])

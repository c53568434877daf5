"""A tiny byte-level BPE tokenizer (trained in a second) for manager tests that need no model."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(['{"name": "Bob", "age": 30, "tags": ["a", "b"]}', "hello world yes no maybe"] * 20,
                           trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")

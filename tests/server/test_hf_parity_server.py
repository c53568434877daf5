"""The server's greedy output and logprobs against HF transformers on the default model (fp32)."""

from __future__ import annotations

from tests.reference import hf_greedy, hf_log_softmax
from tests.server.sse import post

PROMPT = "Once upon a time, in a small village,"
MAX_TOKENS = 10
LOGPROB_TOL = 2e-4  # as tests/engine/test_hf_parity_engine.py


def test_server_greedy_text_and_logprobs_match_hf(open_server, smollm2_tokenizer):
    prompt_ids = smollm2_tokenizer.encode(PROMPT)
    want_ids = hf_greedy(prompt_ids, MAX_TOKENS)
    # Token-id prompt, echo with logprobs: the prompt's logprobs come back too.
    response = post(open_server, "/v1/completions", {"prompt": prompt_ids, "max_tokens": MAX_TOKENS,
                                                     "temperature": 0, "logprobs": 1, "echo": True})
    choice = response["choices"][0]
    assert choice["text"] == smollm2_tokenizer.decode(prompt_ids + want_ids, skip_special_tokens=True)
    assert response["usage"]["completion_tokens"] == len(want_ids)
    ref = hf_log_softmax(prompt_ids + want_ids)
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(prompt_ids) + len(want_ids)
    want = [ref[i - 1, t].item() for i, t in enumerate(prompt_ids + want_ids) if i > 0]
    errors = [abs(g - w) for g, w in zip(got[1:], want, strict=True)]
    assert max(errors) < LOGPROB_TOL, f"max |logprob - HF| = {max(errors):.2e}"

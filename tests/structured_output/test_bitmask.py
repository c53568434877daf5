"""The bitmask path without a model: manager (compile, hold, fill, accept), metadata placement, sampler masks."""

import json
import time

import numpy as np
import pytest
import torch

from pagedllm.core.outputs import GrammarBitmask, RequestUpdate
from pagedllm.core.request import Request
from pagedllm.models.layers.sampler import Sampler
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output import StructuredOutputManager
from pagedllm.worker.sampling_metadata import SamplingMetadata

V = 64


def _allowed(bitmask_row: np.ndarray, vocab_size: int) -> set[int]:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return set(np.flatnonzero(bits).tolist())


def _bitmask(rows: list[set[int]], vocab_size: int = V) -> np.ndarray:
    words = -(-vocab_size // 32)
    out = np.zeros((len(rows), words * 32), dtype=np.uint8)
    for i, allowed in enumerate(rows):
        out[i, sorted(allowed)] = 1
    return np.packbits(out, axis=1, bitorder="little").view(np.int32)


def _greedy_md(n: int, **params) -> SamplingMetadata:
    p = SamplingParams(temperature=0.0, **params)
    return SamplingMetadata.build([p] * n, [[1, 2]] * n, [[]] * n, {}, None, V, "cpu")


def test_bitmask_placed_at_logits_rows_and_applied_only_there() -> None:
    # Batch order a, b, c, d; b is mid-prefill (samples nothing); the engine lists d before a.
    md = _greedy_md(3)
    allowed_d, allowed_a = {5, 9}, {40}
    grammar = GrammarBitmask(["d", "a"], _bitmask([allowed_d, allowed_a]))
    md.add_grammar_bitmask(grammar, ["a", "b", "c", "d"], np.array([1, 0, 1, 1]))
    assert md.grammar_rows == [2, 0]
    logits = torch.randn(3, V)
    logits[:, 7] = 50.0  # the unconstrained favourite
    out = Sampler()(logits.clone(), md).sampled_token_ids.tolist()
    assert out[0] in allowed_a and out[2] in allowed_d
    assert out[1] == 7  # c has no grammar: untouched


def test_no_grammar_no_bitmask() -> None:
    md = _greedy_md(2)
    md.add_grammar_bitmask(None, ["a", "b"], np.array([1, 1]))
    assert md.grammar_bitmask is None


def test_random_sampling_stays_inside_the_mask() -> None:
    md = SamplingMetadata.build([SamplingParams(temperature=1.0)] * 8, [[1]] * 8, [[]] * 8, {}, None, V, "cpu")
    allowed = {3, 17, 33, 63}
    md.add_grammar_bitmask(GrammarBitmask([str(i) for i in range(8)], _bitmask([allowed] * 8)),
                           [str(i) for i in range(8)], np.ones(8, dtype=np.int64))
    for _ in range(20):
        assert set(Sampler()(torch.randn(8, V), md).sampled_token_ids.tolist()) <= allowed


def test_allowed_token_ids_bad_words_and_logit_bias() -> None:
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11], logits[0, 12] = 3.0, 2.0, 1.0
    sampler = Sampler()
    assert sampler(logits, _greedy_md(1)).sampled_token_ids.item() == 10
    assert sampler(logits, _greedy_md(1, allowed_token_ids=[11, 12])).sampled_token_ids.item() == 11
    assert sampler(logits, _greedy_md(1, logit_bias={12: 5.0})).sampled_token_ids.item() == 12
    assert sampler(logits, _greedy_md(1, logit_bias={10: -100.0})).sampled_token_ids.item() == 11
    p = SamplingParams(temperature=0.0, bad_words=["x"])
    p.bad_words_token_ids = [[10], [2, 11]]  # "x" as one token; a two-token word whose prefix is token 2
    md = SamplingMetadata.build([p, p], [[1], [1]], [[2], [3]], {}, None, V, "cpu")
    assert sampler(logits.repeat(2, 1), md).sampled_token_ids.tolist() == [12, 11]


def test_token_constraints_validated() -> None:
    for kwargs, field in [({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {"1": 1.0}}, "logit_bias"),
                          ({"allowed_token_ids": []}, "allowed_token_ids"), ({"bad_words": [""]}, "bad_words")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(allowed_token_ids=[V]).resolve_token_constraints(None, V)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of .* got none"),
    ({"json": "{}", "regex": "a"}, "got json and regex"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"regex": 3}, "structured_outputs.regex"),
])
def test_structured_outputs_params_exactly_one(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_spec_key_is_canonical() -> None:
    a = StructuredOutputsParams(json={"type": "object", "required": ["a"]})
    b = StructuredOutputsParams(json=json.dumps({"required": ["a"], "type": "object"}))
    assert a.key() == b.key() != StructuredOutputsParams(json_object=True).key()


# ---- the manager, on a tiny real tokenizer ------------------------------------------
def _manager(tok) -> StructuredOutputManager:
    return StructuredOutputManager(tok, len(tok) + 8, {tok.eos_token_id}, max_num_seqs=4)


def _release_all(manager: StructuredOutputManager) -> list[Request]:
    deadline = time.monotonic() + 30
    while manager._held and time.monotonic() < deadline:
        manager.wait(0.5)
        ready, failed = manager.release()
        assert not failed
        if ready:
            return [r for r, _ in ready]
    raise AssertionError("grammar never compiled")


def _generate(manager: StructuredOutputManager, req: Request, tok, max_steps: int = 200) -> str:
    """Greedy-by-lowest-id decoding through the manager's bitmask: each step takes the first allowed token."""
    vocab_size = len(tok) + 8
    for _ in range(max_steps):
        req.num_computed_tokens = req.num_tokens - 1
        gb = manager.grammar_bitmask({req.request_id: 1}, {req.request_id: req})
        allowed = sorted(_allowed(gb.bitmask[0], vocab_size))
        assert allowed and max(allowed) < len(tok)  # ids past the tokenizer are never allowed
        # Prefer a non-stop token while there is one, so the output is not trivially empty.
        token = next((t for t in allowed if t != tok.eos_token_id), allowed[0])
        if tok.eos_token_id in allowed and len(req.output_token_ids) > 3:
            token = tok.eos_token_id
        req.append_output_token_ids([token])
        manager.accept([RequestUpdate(req.request_id, [token])])
        if token == tok.eos_token_id:
            return tok.decode(req.output_token_ids[:-1])
    raise AssertionError("no end")


def test_manager_json_schema_end_to_end(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    manager = _manager(tok)
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["age"], "additionalProperties": False}
    manager.add_request("r", StructuredOutputsParams(json=schema))
    req = Request("r", [1, 2], SamplingParams(), tok.eos_token_id)
    manager.hold("r", req, None)
    (released,) = _release_all(manager)
    assert released is req
    text = _generate(manager, req, tok)
    assert json.loads(text)["age"] in range(1, 10)
    manager.free(["r"])
    assert manager.num_tracked == 0


def test_manager_bitmask_only_for_sampling_sequences_and_cache(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    manager = _manager(tok)
    spec = StructuredOutputsParams(choice=["yes", "no"])
    for rid in ("a", "b"):
        manager.add_request(rid, spec)
        manager.hold(rid, Request(rid, [1, 2, 3], SamplingParams(), tok.eos_token_id), None)
    assert len(manager._grammars) == 1  # same spec, one compile
    reqs = {r.request_id: r for r in _release_all(manager) + _release_all_if_any(manager)}
    reqs["a"].num_computed_tokens = 0  # a 2-token chunk of a 3-token prompt: samples nothing
    gb = manager.grammar_bitmask({"a": 2, "b": 3}, reqs)
    assert gb.req_ids == ["b"]
    first = {tok.decode([t]) for t in _allowed(gb.bitmask[0], len(tok) + 8)}
    assert first and all("yes".startswith(s) or "no".startswith(s) for s in first)
    assert manager.grammar_bitmask({}, reqs) is None


def _release_all_if_any(manager: StructuredOutputManager) -> list[Request]:
    return _release_all(manager) if manager._held else []


@pytest.mark.parametrize("spec, field", [
    (StructuredOutputsParams(json={"type": "nonsense"}), "structured_outputs.json cannot be compiled"),
    (StructuredOutputsParams(regex="(abc"), "structured_outputs.regex cannot be compiled: .*parenthesis"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar cannot be compiled"),
])
def test_bad_grammar_is_value_error(tiny_tokenizer, spec: StructuredOutputsParams, field: str) -> None:
    manager = _manager(tiny_tokenizer)
    with pytest.raises(ValueError, match=field):
        manager.add_request("r", spec)
    assert manager.num_tracked == 0


def test_engine_modules_do_not_import_xgrammar() -> None:
    """Requests without a grammar pay nothing, not even the import."""
    import subprocess
    import sys

    code = ("import sys, pagedllm.engine.llm_engine, pagedllm.worker.model_runner, pagedllm.server.api_server; "
            "assert 'xgrammar' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

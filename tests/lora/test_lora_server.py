"""Multi-LoRA through the real server (the default model, fp32) and the official openai client:
a request's model picks the adapter, the tokens match HF transformers + PEFT, adapters load and
unload at run time."""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.lora.peft_adapters import ALL_TARGETS, peft_greedy, save_adapter
from tests.server.launch import running_server

PROMPTS = [[1, 9690, 314, 253, 1345, 28, 260], [1, 504, 3458, 282, 4649, 314]]
NUM_TOKENS = 8
ADAPTERS = {  # name -> (rank, targets, seed)
    "alpha": (8, ["q_proj", "v_proj", "down_proj"], 11),
    "beta": (16, ALL_TARGETS, 12),
    "gamma": (4, ["o_proj", "up_proj"], 13),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Adapters of the default model, HF + PEFT references, and the server with alpha and beta loaded."""
    from tests.reference import hf_model

    root = tmp_path_factory.mktemp("lora_server")
    base = hf_model()
    paths = {name: save_adapter(copy.deepcopy(base), root / name, r, targets, seed, b_std=0.05)
             for name, (r, targets, seed) in ADAPTERS.items()}
    reference = {name: peft_greedy(copy.deepcopy(base), paths[name], PROMPTS, NUM_TOKENS) for name in paths}
    reference[None] = peft_greedy(base, None, PROMPTS, NUM_TOKENS)
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
    try:
        with running_server(root / "server.log", "--dtype", "float32", "--max-model-len", "256",
                            "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
                            "--lora-modules", f"alpha={paths['alpha']}", f"beta={paths['beta']}") as base_url:
            with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
                yield client, base_url, paths, reference
    finally:
        os.environ.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)


def _tokens(client: openai.OpenAI, model: str, prompt: list[int]) -> list[int]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def test_adapters_change_the_default_models_output(setup):
    *_, reference = setup
    for name in ADAPTERS:
        assert reference[name] != reference[None], name  # else the comparison below proves nothing


def test_models_lists_the_base_and_each_adapter(setup):
    client, _, paths, _ = setup
    models = {m.id: m for m in client.models.list().data}
    base = next(iter(models))
    assert set(models) == {base, "alpha", "beta"}
    assert models["alpha"].root == paths["alpha"] and models["alpha"].parent == base


def test_mixed_adapters_match_peft(setup):
    client, _, _, reference = setup
    base = client.models.list().data[0].id
    jobs = [(model, p) for model in ("alpha", "beta", base) for p in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: adapters and the base model in one batch
        got = list(pool.map(lambda job: _tokens(client, job[0], PROMPTS[job[1]]), jobs))
    want = [reference[None if model == base else model][p] for model, p in jobs]
    assert got == want


def test_chat_with_an_adapter(setup):
    client, *_ = setup
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.model == "beta" and chat.usage.completion_tokens == 3


def test_unknown_adapter_is_a_404(setup):
    client, *_ = setup
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="delta", prompt="Hello", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_load_and_unload_at_run_time(setup):
    client, base_url, paths, reference = setup
    load, unload = f"{base_url}/v1/load_lora_adapter", f"{base_url}/v1/unload_lora_adapter"
    r = httpx.post(load, json={"lora_name": "gamma", "lora_path": paths["gamma"]}, timeout=60)
    assert r.status_code == 200 and "gamma" in r.text
    # gamma runs beside alpha and beta with two slots: the scheduler makes one wait.
    jobs = [("gamma", 0), ("alpha", 1), ("beta", 0), ("gamma", 1)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: _tokens(client, job[0], PROMPTS[job[1]]), jobs))
    assert got == [reference[m][p] for m, p in jobs]
    assert "gamma" in {m.id for m in client.models.list().data}
    again = httpx.post(load, json={"lora_name": "gamma", "lora_path": paths["gamma"]}, timeout=60)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = httpx.post(load, json={"lora_name": "bad", "lora_path": "/no/such/dir"}, timeout=60)
    assert bad.status_code == 400 and "is not a directory" in bad.json()["error"]["message"]
    assert httpx.post(unload, json={"lora_name": "gamma"}, timeout=60).status_code == 200
    assert httpx.post(unload, json={"lora_name": "gamma"}, timeout=60).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="Hello", max_tokens=2)
    assert _tokens(client, "alpha", PROMPTS[0]) == reference["alpha"][0]  # the others are unharmed


def test_lora_metrics(setup):
    _, base_url, _, _ = setup
    # The engine's stats reach the server after each step and every second while idle.
    deadline = time.monotonic() + 30
    while 'pagedllm:lora_requests_info{max_lora="2"' not in (text := httpx.get(f"{base_url}/metrics", timeout=30).text):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.5)

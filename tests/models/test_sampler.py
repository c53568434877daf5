"""Tests for the batched sampler: the sampled distribution against an exact reference.

The reference (``reference_probs``) recomputes, one row at a time in float64
numpy, the distribution vLLM defines: penalties, temperature, min_p, top_k,
top_p. Each distribution test repeats one row many times in a batch and runs a
chi-square goodness-of-fit test; the global seed is fixed, so a pass is stable,
and negative controls show the same test rejects a wrong distribution.
"""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pagedllm.models.layers.sampler import Sampler, apply_penalties, apply_top_k_top_p
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampling_metadata import SamplingMetadata

V = 24
NUM_DRAWS = 20_000
# Tests that take a device run on CPU here and on CUDA too where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(1234)


def make_logits(v: int = V, seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * scale


def reference_probs(logits: torch.Tensor, p: SamplingParams, prompt=(), output=()) -> np.ndarray:
    """The exact sampling distribution of one row, written out step by step."""
    x = logits.double().numpy().copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    x = x / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.ones(len(x), dtype=bool)
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    by_value = [int(t) for t in np.argsort(-x) if keep[t]]  # kept tokens, most likely first
    if p.top_k > 0:
        by_value = by_value[: p.top_k]
    if p.top_p < 1:
        mass = probs[by_value] / probs[by_value].sum()
        before = np.concatenate([[0.0], np.cumsum(mass)[:-1]])  # mass of the tokens ranked above
        by_value = [t for t, m in zip(by_value, before) if m < p.top_p]
    out = np.zeros(len(x))
    out[by_value] = probs[by_value]
    return out / out.sum()


def draw_counts(logits: torch.Tensor, p: SamplingParams, prompt=(), output=(), n: int = NUM_DRAWS,
                device: str = "cpu") -> np.ndarray:
    v = logits.shape[0]
    md = SamplingMetadata.build([p] * n, [list(prompt)] * n, [list(output)] * n, {}, None, v, device)
    sampled = Sampler()(logits.to(device).expand(n, v), md).sampled_token_ids
    return np.bincount(sampled.cpu().numpy(), minlength=v)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit; bins with expected count < 5 are pooled. Any draw outside the support gives 0."""
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    small = (~big) & (probs > 0)
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


def assert_fits(counts: np.ndarray, probs: np.ndarray) -> None:
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue > 1e-3, f"p={pvalue:.2e}\nobserved {counts / counts.sum()}\nexpected {probs}"


def assert_rejects(counts: np.ndarray, wrong_probs: np.ndarray) -> None:
    assert chi_square_pvalue(counts, wrong_probs) < 1e-6


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_matches_softmax(temperature):
    logits = make_logits()
    p = SamplingParams(temperature=temperature)
    counts = draw_counts(logits, p)
    assert_fits(counts, reference_probs(logits, p))
    # Negative control: the same draws do not fit the distribution at another temperature.
    assert_rejects(counts, reference_probs(logits, SamplingParams(temperature=temperature * 1.5)))


@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_top_k(top_k):
    logits = make_logits(seed=1)
    p = SamplingParams(temperature=0.9, top_k=top_k)
    counts = draw_counts(logits, p)
    assert (counts > 0).sum() <= top_k
    assert_fits(counts, reference_probs(logits, p))
    if top_k > 1:
        assert_rejects(counts, reference_probs(logits, SamplingParams(temperature=0.9, top_k=top_k - 1)))


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95])
def test_top_p(top_p):
    logits = make_logits(seed=2)
    p = SamplingParams(top_p=top_p)
    counts = draw_counts(logits, p)
    assert_fits(counts, reference_probs(logits, p))
    assert_rejects(counts, reference_probs(logits, SamplingParams()))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p(min_p):
    logits = make_logits(seed=3)
    p = SamplingParams(temperature=1.2, min_p=min_p)
    counts = draw_counts(logits, p)
    assert_fits(counts, reference_probs(logits, p))
    assert_rejects(counts, reference_probs(logits, SamplingParams(temperature=1.2)))


@pytest.mark.parametrize("device", DEVICES)
def test_all_filters_combined(device):
    logits = make_logits(v=32, seed=4)
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.85, min_p=0.02)
    counts = draw_counts(logits, p, device=device)
    assert_fits(counts, reference_probs(logits, p))
    # Order matters: top_p over the top_k survivors differs from top_p alone.
    assert_rejects(counts, reference_probs(logits, SamplingParams(temperature=0.8, top_p=0.85)))


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_covers_prompt_and_output(device):
    logits = make_logits(seed=5)
    # Penalize both positive and negative logits, some in the prompt only, some in the output only.
    pos = [int(t) for t in torch.nonzero(logits > 0).flatten()[:3]]
    neg = [int(t) for t in torch.nonzero(logits < 0).flatten()[:3]]
    prompt, output = [pos[0], neg[0], pos[1]], [neg[1], pos[2], pos[2], neg[2]]
    p = SamplingParams(repetition_penalty=1.8)
    counts = draw_counts(logits, p, prompt, output, device=device)
    assert_fits(counts, reference_probs(logits, p, prompt, output))
    # Without the prompt's tokens the distribution is different: the prompt must count.
    assert_rejects(counts, reference_probs(logits, p, (), output))


def test_presence_and_frequency_penalties_use_output_only():
    logits = make_logits(seed=6)
    order = torch.argsort(logits, descending=True).tolist()
    prompt = order[:2]  # presence/frequency must ignore these
    output = [order[0], order[0], order[0], order[2], order[3], order[3]]
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4)
    counts = draw_counts(logits, p, prompt, output)
    assert_fits(counts, reference_probs(logits, p, prompt, output))
    assert_rejects(counts, reference_probs(logits, p, (), output + prompt))
    # Negative penalties (allowed down to -2) make repeats more likely.
    p_neg = SamplingParams(presence_penalty=-0.5, frequency_penalty=-0.3)
    assert_fits(draw_counts(logits, p_neg, prompt, output), reference_probs(logits, p_neg, prompt, output))


def test_mixed_batch_rows_keep_their_own_params():
    """Rows with different params, interleaved in one batch, each follow their own distribution."""
    logits = [make_logits(seed=10), make_logits(seed=11), make_logits(seed=12)]
    params = [SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(top_p=0.6, repetition_penalty=1.5),
              SamplingParams(temperature=1.3, min_p=0.1, frequency_penalty=0.5)]
    outputs = [[1, 2], [3, 3, 4], [int(torch.argmax(logits[2]))] * 3]
    prompts = [[5], [int(torch.argmax(logits[1]))], []]
    n = 12_000
    idx = [i % 3 for i in range(n)]
    md = SamplingMetadata.build([params[i] for i in idx], [prompts[i] for i in idx],
                                [outputs[i] for i in idx], {}, None, V, "cpu")
    sampled = Sampler()(torch.stack([logits[i] for i in idx]), md).sampled_token_ids.numpy()
    for g in range(3):
        counts = np.bincount(sampled[g::3], minlength=V)
        assert_fits(counts, reference_probs(logits[g], params[g], prompts[g], outputs[g]))


def _run_seeded(batch_logits, batch_params, seeds: dict[int, int], num_steps: int,
                device: str) -> dict[int, list[int]]:
    """Sample ``num_steps`` times; return each seeded row's tokens. Generators persist across steps."""
    generators = {row: torch.Generator(device=device).manual_seed(s) for row, s in seeds.items()}
    n = len(batch_params)
    tokens: dict[int, list[int]] = {row: [] for row in seeds}
    for _ in range(num_steps):
        md = SamplingMetadata.build(batch_params, [[]] * n, [[]] * n, generators, None, V, device)
        sampled = Sampler()(batch_logits.to(device), md).sampled_token_ids.cpu()
        for row in seeds:
            tokens[row].append(int(sampled[row]))
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seed_gives_same_tokens_in_any_batch(device):
    row_logits = make_logits(seed=20, scale=0.5)
    p = SamplingParams(temperature=1.1, top_p=0.95, seed=7)
    # Batch A: seeded row 0, another seeded row, unseeded rows, different filters.
    a_params = [p, SamplingParams(seed=3), SamplingParams(top_k=4), SamplingParams(temperature=0.0)]
    a_logits = torch.stack([row_logits, make_logits(seed=21), make_logits(seed=22), make_logits(seed=23)])
    # Batch B: the same request at row 5 of a bigger batch with other neighbours.
    b_params = [SamplingParams(min_p=0.2)] * 5 + [p] + [SamplingParams(seed=99), SamplingParams()]
    b_logits = torch.stack([make_logits(seed=30 + i) for i in range(5)]
                           + [row_logits, make_logits(seed=40), make_logits(seed=41)])
    torch.manual_seed(1)
    in_a = _run_seeded(a_logits, a_params, {0: 7, 1: 3}, num_steps=40, device=device)
    torch.manual_seed(2)  # different unseeded noise must not matter
    in_b = _run_seeded(b_logits, b_params, {5: 7, 6: 99}, num_steps=40, device=device)
    assert in_a[0] == in_b[5]
    assert len(set(in_a[0])) > 3  # it really samples
    other_seed = _run_seeded(b_logits, b_params, {5: 8}, num_steps=40, device=device)
    assert other_seed[5] != in_a[0]


def test_seeded_rows_follow_the_distribution():
    logits = make_logits(seed=24)
    p = SamplingParams(temperature=0.9, top_k=8, seed=0)
    n = 8_000
    generators = {row: torch.Generator().manual_seed(row) for row in range(0, n, 2)}  # half seeded
    md = SamplingMetadata.build([p] * n, [[]] * n, [[]] * n, generators, None, V, "cpu")
    sampled = Sampler()(logits.expand(n, V), md).sampled_token_ids.numpy()
    expected = reference_probs(logits, p)
    assert_fits(np.bincount(sampled[0::2], minlength=V), expected)
    assert_fits(np.bincount(sampled[1::2], minlength=V), expected)


def test_greedy_rows_equal_argmax_of_penalized_logits():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(50)) * 2
    greedy = SamplingParams(temperature=0.0, top_k=3, repetition_penalty=2.0, presence_penalty=1.0)
    rand = SamplingParams(temperature=1.0)
    params = [greedy if i % 2 == 0 else rand for i in range(64)]
    outputs = [logits[i].topk(2).indices.tolist() for i in range(64)]  # penalize each row's top two
    md = SamplingMetadata.build(params, [[]] * 64, outputs, {}, None, V, "cpu")
    assert not md.all_greedy and not md.all_random
    sampled = Sampler()(logits, md).sampled_token_ids
    for i in range(0, 64, 2):
        assert int(sampled[i]) == int(np.argmax(reference_probs(logits[i], SamplingParams(
            temperature=1.0, repetition_penalty=2.0, presence_penalty=1.0), (), outputs[i])))
    # All-greedy batch without penalties: exactly argmax.
    md = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 64, [[]] * 64, [[]] * 64, {}, None, V, "cpu")
    assert md.all_greedy
    assert torch.equal(Sampler()(logits, md).sampled_token_ids, logits.argmax(dim=-1))
    # Ties (common with bf16 logits) go to the first maximum, as argmax breaks them.
    tied = torch.zeros(64, V)
    for i in range(64):
        tied[i, [i % V, (i + 17) % V, V - 1 - i % 5]] = 3.0
    assert torch.equal(Sampler()(tied, md).sampled_token_ids, tied.argmax(dim=-1))
    assert Sampler()(tied, md).sampled_token_ids.tolist() != (tied.shape[1] - 1 - tied.flip(-1).argmax(-1)).tolist()


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(3, V)
    logits[:, 7] = 10.0  # EOS, by far the most likely
    logits[:, 9] = 9.0  # a stop_token_id, next
    logits[:, 2] = 8.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9, 10_000])  # 10_000 is out of vocab
    stops = [{7, 9, 10_000}] * 3
    outputs = [[1], [1, 1], [1, 1, 1]]  # the last row has reached min_tokens
    md = SamplingMetadata.build([p] * 3, [[]] * 3, outputs, {}, stops, V, "cpu")
    assert md.min_tokens_mask is not None
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [2, 2, 7]
    # Random rows too: the stop ids are never drawn.
    p_rand = SamplingParams(temperature=1.0, min_tokens=5)
    md = SamplingMetadata.build([p_rand] * 2000, [[]] * 2000, [[]] * 2000, {}, [{7, 9}] * 2000, V, "cpu")
    sampled = Sampler()(logits[:1].expand(2000, V), md).sampled_token_ids
    assert not torch.isin(sampled, torch.tensor([7, 9])).any()
    # Without stop ids given, params.all_stop_token_ids is used.
    md = SamplingMetadata.build([p] * 3, [[]] * 3, outputs, {}, None, V, "cpu")
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [7, 7, 7]  # 9 masked, 7 (EOS) not known


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_topk_with_sampled_first(device):
    n = 200
    logits = (torch.randn(n, V, generator=torch.Generator().manual_seed(60)) * 2).to(device)
    params = [SamplingParams(temperature=0.6, logprobs=5, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, logprobs=2), SamplingParams(top_p=0.5)]
    rows = [params[i % 3] for i in range(n)]
    outputs = [[i % V] for i in range(n)]
    md = SamplingMetadata.build(rows, [[]] * n, outputs, {}, None, V, device)
    assert md.max_num_logprobs == 5
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits, dim=-1)  # raw: before penalties and temperature
    top = torch.topk(ref, 5, dim=-1)
    assert out.logprob_token_ids.shape == (n, 6) and out.logprobs.shape == (n, 6)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    torch.testing.assert_close(out.logprobs[:, 1:], top.values)
    torch.testing.assert_close(out.logprobs[:, 0], ref.gather(1, out.sampled_token_ids[:, None]).squeeze(1))
    ref, sampled, ranks = ref.cpu(), out.sampled_token_ids.cpu().tolist(), out.sampled_ranks.cpu().tolist()
    for i, s in enumerate(sampled):
        assert ranks[i] == 1 + int((ref[i] > ref[i, s]).sum())
    assert (out.sampled_ranks > 1).any()  # sampled rows do not always pick the top token
    # logprobs=0: only the sampled token.
    md = SamplingMetadata.build([SamplingParams(logprobs=0)] * 4, [[]] * 4, [[]] * 4, {}, None, V, device)
    out = Sampler()(logits[:4], md)
    assert out.logprobs.shape == (4, 1)
    # No logprobs requested: none computed.
    md = SamplingMetadata.build([SamplingParams()] * 4, [[]] * 4, [[]] * 4, {}, None, V, device)
    assert Sampler()(logits[:4], md).logprobs is None


def test_sampler_does_not_modify_logits():
    logits = torch.randn(8, V)
    before = logits.clone()
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                       presence_penalty=0.5, min_tokens=2, stop_token_ids=[3])
    md = SamplingMetadata.build([p] * 8, [[1]] * 8, [[2]] * 8, {}, None, V, "cpu")
    Sampler()(logits, md)
    assert torch.equal(logits, before)


def test_top_k_keeps_ties_and_top_p_keeps_the_best():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    apply_top_k_top_p(logits, torch.tensor([2, 5]), torch.tensor([1.0, 0.01]))
    assert torch.isinf(logits[0]).tolist() == [False, False, False, True, True]  # tie at k=2 kept
    assert torch.isinf(logits[1]).tolist() == [False, True, True, True, True]  # top_p tiny: best stays


def test_apply_penalties_matches_loop():
    logits = torch.randn(3, V)
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3),
              SamplingParams(presence_penalty=-0.4), SamplingParams()]
    prompts, outputs = [[0, 1, 1], [2], [3]], [[4, 4, 0], [5, 5, 5, 2], []]
    md = SamplingMetadata.build(params, prompts, outputs, {}, None, V, "cpu")
    got = apply_penalties(logits, md)
    for i, p in enumerate(params):
        want = logits[i].clone()
        for t in set(prompts[i]) | set(outputs[i]):
            want[t] = want[t] / p.repetition_penalty if want[t] > 0 else want[t] * p.repetition_penalty
        for t, c in Counter(outputs[i]).items():
            want[t] -= p.frequency_penalty * c + p.presence_penalty
        torch.testing.assert_close(got[i], want)


def test_build_skips_unused_tensors_and_pads_outputs():
    md = SamplingMetadata.build([SamplingParams()] * 2, [[1], [2]], [[3], [4]], {}, None, V, "cpu")
    assert md.all_random and not md.all_greedy and md.no_penalties
    for name in ("top_k", "top_p", "min_p", "output_token_ids", "prompt_token_ids", "min_tokens_mask",
                 "max_num_logprobs", "presence_penalties", "frequency_penalties", "repetition_penalties"):
        assert getattr(md, name) is None, name
    # Filters set only on a greedy row are not built; top_k >= V is a no-op.
    md = SamplingMetadata.build([SamplingParams(temperature=0.0, top_k=3), SamplingParams(top_k=V)],
                                [[]] * 2, [[]] * 2, {}, None, V, "cpu")
    assert md.top_k is None
    md = SamplingMetadata.build([SamplingParams(frequency_penalty=0.5), SamplingParams(top_k=4)],
                                [[1, 2]] * 2, [[5, 6, 7], []], {}, None, V, "cpu")
    assert md.prompt_token_ids is None  # only repetition penalty needs the prompt
    assert md.output_token_ids.tolist() == [[5, 6, 7], [V, V, V]]
    assert md.top_k.tolist() == [V, 4]

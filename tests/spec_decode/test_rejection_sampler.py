"""The rejection sampler preserves the target distribution (chi-square), with negative controls.

Each test verifies many independent requests at once: R requests with the same
target logits per position, drafts drawn from a known draft distribution q. The
emitted tokens must follow the target's processed distribution p, whatever q is
(far from p or close to it). Negative controls feed the same machinery a wrong q
(drafts always accepted; a misstated q) and must be rejected by the same test, so
the test has the power to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.rejection_sampler import RejectionSampler
from pagedllm.worker.sampling_metadata import SamplingMetadata

V = 6
R = 20000  # requests per test
P_OK = 1e-3  # a correct sampler fails this with probability 0.001 per test (all tests are seeded anyway)

LOGITS_1 = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
LOGITS_2 = torch.tensor([-1.0, 0.0, 2.0, 0.3, 1.0, -0.5])
Q_FAR = torch.tensor([0.02, 0.02, 0.02, 0.04, 0.1, 0.8])  # mass where p has little
Q_CLOSE = torch.softmax(LOGITS_1 + torch.tensor([0.3, -0.2, 0.1, 0.0, -0.3, 0.2]), 0)


def _md(n_rows: int, params: SamplingParams, generators: dict | None = None) -> SamplingMetadata:
    return SamplingMetadata.build([params] * n_rows, [[0]] * n_rows, [[]] * n_rows, generators or {}, None, V, "cpu")


def _verify(k: int, q: torch.Tensor, params: SamplingParams, draft_probs_as: str = "true",
            seed: int = 0) -> list[list[int]]:
    """R requests, k drafts each drawn from q; targets LOGITS_1, LOGITS_2, ... per position."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = [LOGITS_1, LOGITS_2, LOGITS_1][:k + 1]
    logits = torch.stack(targets).repeat(R, 1)  # (R * (k + 1), V)
    drafts = torch.multinomial(q, R * k, replacement=True, generator=gen).view(R, k)
    draft_ids = np.full((R, k + 1), -1, dtype=np.int64)
    draft_ids[:, :k] = drafts.numpy()
    q_rows = {"true": q, "zeros": torch.zeros(V), "uniform": torch.full((V,), 1.0 / V)}[draft_probs_as]
    draft_probs = q_rows.repeat(R * (k + 1), 1)
    out = RejectionSampler()(logits, _md(R * (k + 1), params), draft_ids.reshape(-1),
                             np.full(R, k + 1, dtype=np.int64), draft_probs)
    return out.token_ids


def _p_value(samples: list[int], expected_probs: torch.Tensor) -> float:
    observed = np.bincount(samples, minlength=V)
    expected = expected_probs.double().numpy() * len(samples)
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token outside the target's support was emitted"
    return chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue


@pytest.mark.parametrize("q", [Q_FAR, Q_CLOSE], ids=["far", "close"])
def test_first_token_follows_the_target(q: torch.Tensor) -> None:
    tokens = _verify(1, q, SamplingParams(temperature=1.0))
    assert _p_value([t[0] for t in tokens], torch.softmax(LOGITS_1, 0)) > P_OK
    # The bonus token after an accepted draft follows the next position's target.
    assert _p_value([t[1] for t in tokens if len(t) == 2], torch.softmax(LOGITS_2, 0)) > P_OK


@pytest.mark.parametrize("q", [Q_FAR, Q_CLOSE], ids=["far", "close"])
def test_negative_control_always_accepting_is_detected(q: torch.Tensor) -> None:
    """q stated as 0 everywhere: every draft is accepted, so the output follows q, not p."""
    tokens = _verify(1, q, SamplingParams(temperature=1.0), draft_probs_as="zeros")
    assert _p_value([t[0] for t in tokens], torch.softmax(LOGITS_1, 0)) < 1e-6


def test_negative_control_misstated_draft_distribution_is_detected() -> None:
    """Drafts drawn from Q_FAR but the sampler told they came from a uniform q: biased output."""
    tokens = _verify(1, Q_FAR, SamplingParams(temperature=1.0), draft_probs_as="uniform")
    assert _p_value([t[0] for t in tokens], torch.softmax(LOGITS_1, 0)) < 1e-6


def test_point_mass_drafts_two_positions() -> None:
    """n-gram drafts (draft_probs None): both emitted positions follow their targets."""
    torch.manual_seed(3)
    logits = torch.stack([LOGITS_1, LOGITS_2, LOGITS_1]).repeat(R, 1)
    draft_ids = np.tile(np.array([5, 2, -1]), R)  # a fixed guess, as a prompt lookup makes
    out = RejectionSampler()(logits, _md(R * 3, SamplingParams(temperature=1.0)), draft_ids,
                             np.full(R, 3, dtype=np.int64))
    first = [t[0] for t in out.token_ids]
    assert _p_value(first, torch.softmax(LOGITS_1, 0)) > P_OK
    second = [t[1] for t in out.token_ids if len(t) >= 2]  # only after d1 = 5 was accepted
    assert _p_value(second, torch.softmax(LOGITS_2, 0)) > P_OK
    accepted_1 = np.mean([len(t) >= 2 for t in out.token_ids])
    assert accepted_1 == pytest.approx(torch.softmax(LOGITS_1, 0)[5].item(), abs=0.01)


def test_processed_target_temperature_top_k() -> None:
    """Temperature and top-k apply to p: tokens outside the top 3 never appear."""
    params = SamplingParams(temperature=0.7, top_k=3)
    tokens = _verify(1, Q_FAR, params)
    expected = torch.softmax(LOGITS_1 / 0.7, 0)
    expected[3:] = 0.0  # LOGITS_1 is sorted: the top 3 are tokens 0..2
    assert _p_value([t[0] for t in tokens], expected / expected.sum()) > P_OK


def test_greedy_accepts_while_the_argmax_matches() -> None:
    logits = torch.stack([LOGITS_1, LOGITS_2, LOGITS_1, LOGITS_2])  # argmax 0, 2, 0, 2
    draft_ids = np.array([0, 2, 3, -1])
    out = RejectionSampler()(logits, _md(4, SamplingParams(temperature=0.0)), draft_ids, np.array([4]))
    assert out.token_ids == [[0, 2, 0]]  # d3 = 3 rejected, the argmax 0 emitted instead
    out = RejectionSampler()(logits, _md(4, SamplingParams(temperature=0.0)), np.array([0, 2, 0, -1]),
                             np.array([4]))
    assert out.token_ids == [[0, 2, 0, 2]]  # all accepted plus the bonus argmax


def test_seeded_requests_are_reproducible_and_logprobs_are_the_targets() -> None:
    logits = torch.stack([LOGITS_1, LOGITS_2, LOGITS_1] * 8)
    draft_ids = np.tile(np.array([1, 2, -1]), 8)
    params = SamplingParams(temperature=1.0, seed=7, logprobs=2)

    def run(seed: int) -> tuple[list[list[int]], list]:
        gens = {i: torch.Generator().manual_seed(seed + i // 3) for i in range(24)}
        out = RejectionSampler()(logits, _md(24, params, gens), draft_ids, np.full(8, 3))
        return out.token_ids, out.logprobs

    (a, lp_a), (b, _), (c, _) = run(7), run(7), run(8)
    assert a == b and a != c
    raw = torch.log_softmax(torch.stack([LOGITS_1, LOGITS_2, LOGITS_1]), -1)
    for toks, lp in zip(a, lp_a):
        assert [ids[0] for ids in lp.token_ids] == toks
        for pos, (tok, lps) in enumerate(zip(toks, lp.logprobs)):
            assert lps[0] == pytest.approx(raw[pos, tok].item(), abs=1e-5)
            assert lp.token_ids[pos][1:] == raw[pos].topk(2).indices.tolist()

"""Sampling: the cut top-k / top-p make, found among a few candidates, is the one a sort of the whole vocabulary makes;
draws follow the distribution and never pick a masked token."""

from __future__ import annotations

import pytest
import torch

from flashmoe.sampling import FIRST_CANDIDATES, distribution, reference_distribution, sample


def dense(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    ids, weights = distribution(logits, temperature, top_p, top_k)
    out = weights if ids is None else torch.zeros(logits.shape[-1]).index_put_((ids,), weights)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 0.5, 0), (1.3, 0.99, 0),
                                                     (1.0, 1.0, 40), (0.7, 0.95, 20), (1.0, 0.9, 4000)])
def test_the_cut_is_the_one_a_full_sort_makes(temperature, top_p, top_k):
    gen = torch.Generator().manual_seed(0)
    widened = 0
    for scale in (0.3, 2.0, 8.0):  # flat to peaked: the nucleus from thousands of tokens to a few
        for _ in range(10):
            logits = torch.randn(5000, generator=gen) * scale
            got, want = dense(logits, temperature, top_p, top_k), reference_distribution(logits, temperature, top_p, top_k)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
            widened += int((got > 0).sum()) > FIRST_CANDIDATES
    assert top_p == 1.0 or top_k or widened  # some nuclei were wider than the first candidates


def test_draws_follow_the_distribution_and_skip_masked_tokens():
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.5, 0.0, float("-inf"), -1.0, 1.5])
    for temperature, top_p, top_k in [(1.0, 1.0, 0), (0.8, 0.9, 0), (1.0, 1.0, 3)]:
        probs = dense(logits, temperature, top_p, top_k)
        counts = torch.bincount(torch.tensor([sample(logits, temperature, top_p, top_k, gen) for _ in range(20000)]),
                                minlength=8)
        assert counts[probs == 0].sum() == 0  # masked or cut: never drawn
        assert torch.allclose(counts / 20000, probs, atol=0.015)  # binomial sd <= 0.0036: 4 sd
    assert sample(torch.tensor([0.0, float("-inf")]), 1.0, generator=gen) == 0


def test_temperature_zero_is_argmax_and_a_seed_repeats():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert sample(logits) == int(logits.argmax())
    draws = [[sample(logits, 1.0, 0.9, 50, torch.Generator().manual_seed(7)) for _ in range(3)] for _ in range(2)]
    assert draws[0] == draws[1]

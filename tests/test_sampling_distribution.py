"""Jacobi sampling draws the first tokens from the autoregressive sampling distribution.

The reference is exact: the joint law of the first tokens under autoregressive sampling with
transformers' own processors in FastChat's order (temperature, repetition penalty, top-p, top-k),
enumerated over the sampling support. Seeded Jacobi samples (block sizes > 1, guesses that are
sometimes right) must fit it by a chi-square test, under both acceptance rules; the same test
must reject a deliberately wrong rule run through the same engine (always accept the guess; on
rejection, resample without removing the guess).
"""
from __future__ import annotations

import pytest
import torch

from harness import (NEW_TOKENS, PROMPT, SAMPLES, SETTINGS, ar_distribution, chi_square_p,
                     hf_processors, jacobi_samples, peaked_model)
from fastchat_cllm.core import sampling
from fastchat_cllm.core.verify import Verdict


def always_accept(window: list[int], scores: torch.Tensor, noise: torch.Tensor) -> Verdict:
    """A wrong rule: every guess is taken as final; the token after them is sampled."""
    predictions = (scores + noise).argmax(-1).tolist()
    return Verdict(len(window), predictions[-1], predictions)


def keep_the_guess(probs: torch.Tensor, guess: int, generator: torch.Generator) -> int:
    """A wrong resample for the speculative rule: the rejected guess may be drawn again."""
    return int(torch.multinomial(probs, 1, generator=generator))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return peaked_model()


@pytest.fixture(scope="module")
def law(model):
    law = ar_distribution(model, PROMPT, NEW_TOKENS, hf_processors(SETTINGS))
    assert abs(sum(law.values()) - 1) < 1e-6
    assert 20 <= len(law) < 3 ** NEW_TOKENS        # many outcomes; top-p cut some
    return law


@pytest.mark.parametrize("acceptance", ["gumbel", "speculative"])
def test_jacobi_sampling_fits_ar_distribution(model, law, acceptance):
    counts, accepted, rejected = jacobi_samples(model, acceptance)
    p_value = chi_square_p(counts, law, SAMPLES)
    print(f"\nchi-square p-value ({acceptance} rule) = {p_value:.4f}; outcomes {len(law)}, "
          f"guesses accepted {accepted}, forwards with a rejection {rejected}")
    assert accepted > SAMPLES // 20 and rejected > SAMPLES // 2   # the rule was exercised
    assert p_value > 1e-3


@pytest.mark.parametrize("acceptance, target, wrong", [
    ("gumbel", "verify_sampled", always_accept),
    ("speculative", "resample_without", keep_the_guess)])
def test_wrong_rule_fails_the_same_check(model, law, monkeypatch, acceptance, target, wrong):
    monkeypatch.setattr(sampling, target, wrong)
    counts, _, _ = jacobi_samples(model, acceptance)
    p_value = chi_square_p(counts, law, SAMPLES)
    print(f"\nchi-square p-value ({acceptance}, {wrong.__name__}) = {p_value:.3g}")
    assert p_value < 1e-6

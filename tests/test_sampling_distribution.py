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
from transformers.generation.logits_process import (LogitsProcessorList,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from harness import TINY
from fastchat_cllm import jacobi_stream
from fastchat_cllm.core import sampling
from fastchat_cllm.core.verify import Verdict

SETTINGS = dict(temperature=0.7, top_p=0.5, top_k=3, repetition_penalty=1.2)
NEW_TOKENS, SAMPLES = 4, 3000
PROMPT = [3, 7, 4, 9, 3, 7, 4]


def hf_processors(s: dict) -> LogitsProcessorList:
    return LogitsProcessorList([TemperatureLogitsWarper(s["temperature"]),
                                RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]),
                                TopPLogitsWarper(s["top_p"]), TopKLogitsWarper(s["top_k"])])


@torch.inference_mode()
def ar_distribution(model, prompt: list[int], steps: int, s: dict) -> dict[tuple, float]:
    """Exact law of the first `steps` tokens under autoregressive sampling (full forwards)."""
    processors = hf_processors(s)
    law = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for seq, prob in law.items():
            ids = torch.tensor([prompt + list(seq)])
            scores = processors(ids, model(input_ids=ids).logits[:, -1, :].float())
            probs = scores.softmax(-1)[0].double()
            for tok in probs.nonzero()[:, 0].tolist():
                grown[seq + (tok,)] = prob * float(probs[tok])
        law = grown
    return law


def chi_square_p(counts: dict[tuple, int], law: dict[tuple, float], total: int) -> float:
    """Goodness-of-fit p-value; outcomes expected fewer than 5 times are pooled into one cell."""
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for seq, prob in law.items():
        if prob * total >= 5:
            observed.append(counts.get(seq, 0))
            expected.append(prob * total)
        else:
            pooled_o, pooled_e = pooled_o + counts.get(seq, 0), pooled_e + prob * total
    pooled_o += sum(n for seq, n in counts.items() if seq not in law)   # impossible outcomes
    if pooled_e > 0 or pooled_o:
        observed.append(pooled_o)
        expected.append(max(pooled_e, 1e-9))
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    statistic = float(((o - e) ** 2 / e).sum())
    df = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(statistic / 2, dtype=torch.float64)))


def jacobi_samples(model, acceptance: str) -> tuple[dict[tuple, int], int, int]:
    """Outcome counts of SAMPLES seeded runs; also guesses accepted and rejected in all."""
    counts: dict[tuple, int] = {}
    accepted = rejected = 0
    for seed in range(SAMPLES):
        tokens = []
        for step in jacobi_stream(model, PROMPT, max_new_tokens=NEW_TOKENS, block_size=4,
                                  adaptive=False, seed=seed, acceptance=acceptance, **SETTINGS):
            tokens += step.tokens
            if step.window:
                accepted += step.accepted - 1
                rejected += step.accepted < len(step.window)
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts, accepted, rejected


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
    """A tiny Llama with a 12-token vocabulary and a scaled-up output head (peaked
    distributions, so top-p bites)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": 12}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def law(model):
    law = ar_distribution(model, PROMPT, NEW_TOKENS, SETTINGS)
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

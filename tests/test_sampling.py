"""Sampling in the Jacobi engine: processors, the acceptance rule, reproducibility, greedy paths."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from harness import ar_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.core.sampling import (GreedyRule, acceptance_rule, gumbel, prefix_presence,
                                         process_logits, top_p_filter, verify_sampled,
                                         verify_speculative)

MODES = {
    "ar": dict(window_size=1),
    "sliding-5": dict(window_size=5, adaptive=False),
    "adaptive-16": dict(window_size=16),
    "fixed-random-7": dict(window_size=7, adaptive=False, fixed_blocks=True, fill="random"),
}
SETTINGS = {
    "temperature": dict(temperature=0.8),
    "all": dict(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3),
    "penalty-below-one": dict(temperature=1.0, top_p=0.95, repetition_penalty=0.7),
}



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    model = tiny_model("qwen2", seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)   # peaked distributions, as a trained model has
    return model


def prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_p=0.9, top_k=4, repetition_penalty=1.4),
                                      dict(temperature=1.3, top_p=0.5, repetition_penalty=0.8),
                                      dict(temperature=0.5, top_k=1)])
def test_processing_matches_transformers_per_position(settings):
    """Row i is processed with its own prefix: the final text plus window[:i+1]."""
    config = JacobiConfig(**settings)
    g = torch.Generator().manual_seed(0)
    text, window = torch.randint(0, 40, (9,), generator=g), torch.randint(0, 40, (6,), generator=g)
    logits = 3 * torch.randn(6, 40, generator=g)
    seen = torch.zeros(40, dtype=torch.bool)
    seen[text] = True
    ours = process_logits(logits, prefix_presence(seen, window), config)
    reference = LogitsProcessorList([TemperatureLogitsWarper(config.temperature),
                                     RepetitionPenaltyLogitsProcessor(config.repetition_penalty)])
    if config.top_p < 1:
        reference.append(TopPLogitsWarper(config.top_p))
    if config.top_k:
        reference.append(TopKLogitsWarper(config.top_k))
    for i in range(6):
        prefix = torch.cat([text, window[: i + 1]])[None]
        expected = reference(prefix, logits[i: i + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(expected))
        finite = ~torch.isinf(expected)
        assert torch.allclose(ours[i][finite], expected[finite], atol=1e-5)


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])     # flat rows need the vocabulary sorted
def test_top_p_matches_transformers_on_a_large_vocabulary(scale):
    g = torch.Generator().manual_seed(1)
    scores = scale * torch.randn(5, 3000, generator=g)
    for top_p in (0.3, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(top_p_filter(scores, top_p), expected)


def test_rule_accepts_with_probability_p_and_resamples_without_the_guess():
    """For a guess chosen without the noise: P(accept g) = p(g); rejected -> p without g."""
    scores = torch.tensor([[1.2, 0.4, -0.3, 0.9, -2.0], [0.0] * 5])   # row 0 judges the guess
    p = scores[0].softmax(-1).double()
    guess, draws = 3, 20000
    generator = torch.Generator().manual_seed(0)
    taken = torch.zeros(5, dtype=torch.float64)
    accepted = 0
    for _ in range(draws):
        noise = torch.stack([gumbel(generator, 5, scores.device) for _ in range(2)])
        verdict = verify_sampled([0, guess], scores, noise)
        if verdict.accepted == 2:
            accepted += 1
        else:
            assert verdict.accepted == 1 and verdict.next_token != guess
            taken[verdict.next_token] += 1
    residual = p.clone()
    residual[guess] = 0
    residual /= residual.sum()
    assert abs(accepted / draws - p[guess]) < 0.015          # binomial sd ~0.0034
    assert 0.5 * (taken / taken.sum() - residual).abs().sum() < 0.02


def test_speculative_rule_accepts_with_probability_p_and_resamples_without_the_guess():
    """Fresh randomness per call: P(accept g) = p(g), the second guess is judged only after the
    first is accepted, and a rejected position's token is drawn from p without its guess."""
    scores = torch.tensor([[1.2, 0.4, -0.3, 0.9, -2.0], [0.5, -1.0, 2.0, 0.0, 0.3], [0.0] * 5])
    p = scores.softmax(-1).double()
    window, draws = [0, 3, 2], 20000
    generator = torch.Generator().manual_seed(0)
    accepted = torch.zeros(3)
    taken = torch.zeros(5, dtype=torch.float64)
    for _ in range(draws):
        verdict = verify_speculative(window, scores, generator)
        accepted[verdict.accepted - 1] += 1
        assert verdict.predictions[: verdict.accepted - 1] == window[1: verdict.accepted]
        if verdict.accepted == 1:
            assert verdict.next_token != 3
            taken[verdict.next_token] += 1
    both = float(p[0, 3] * p[1, 2])
    assert abs(accepted[1:].sum() / draws - p[0, 3]) < 0.015       # binomial sd ~0.0034
    assert abs(accepted[2] / draws - both) < 0.015
    residual = p[0].clone()
    residual[3] = 0
    residual /= residual.sum()
    assert 0.5 * (taken / taken.sum() - residual).abs().sum() < 0.02


def test_speculative_rule_is_reproducible_for_a_fixed_window(model):
    options = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, acceptance="speculative",
                   window_size=6, adaptive=False)
    runs = [jacobi_generate(model, prompt(7), seed=seed, **options) for seed in (3, 3, 4)]
    assert runs[0].tokens == runs[1].tokens and runs[0].tokens != runs[2].tokens
    assert sum(r.stats.fast_forwarded for r in runs) > 0


@pytest.mark.parametrize("settings", SETTINGS)
def test_seeded_output_is_the_same_for_every_block_size_and_fill(model, settings):
    """The noise belongs to output positions: block size 1 (AR sampling) fixes the text."""
    ids = prompt(7)
    texts = set()
    for seed in range(4):
        outputs = {name: jacobi_generate(model, ids, max_new_tokens=24, seed=seed,
                                         **SETTINGS[settings], **mode).tokens
                   for name, mode in MODES.items()}
        assert all(out == outputs["ar"] for out in outputs.values()), outputs
        texts.add(tuple(outputs["ar"]))
    assert len(texts) >= 3          # different seeds, different samples


def test_sampling_accepts_guesses(model):
    """Carried guesses are the previous forward's samples: the window fast-forwards."""
    out = jacobi_generate(model, prompt(5), max_new_tokens=60, window_size=8, adaptive=False,
                          seed=0, temperature=0.7, top_p=0.9)
    assert out.stats.fast_forwarded > 0
    assert out.stats.tokens == 60 and out.finish_reason == "length"


def test_eos_ends_sampled_output(model):
    ids = prompt(6, seed=3)
    free = jacobi_generate(model, ids, max_new_tokens=40, window_size=1, seed=2, temperature=0.9)
    eos = next(tok for i, tok in enumerate(free.tokens) if i > 4 and tok not in free.tokens[:i])
    out = jacobi_generate(model, ids, max_new_tokens=40, window_size=8, adaptive=False, seed=2,
                          temperature=0.9, eos_token_id=eos, logprobs=1)
    assert out.tokens == free.tokens[: free.tokens.index(eos) + 1]
    assert out.finish_reason == "stop" and len(out.logprobs) == len(out.tokens)


@pytest.mark.parametrize("mode", ["ar", "sliding-5", "adaptive-16"])
def test_greedy_with_repetition_penalty_equals_transformers(model, mode):
    ids = torch.tensor([prompt(8, seed=5)])
    expected = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3,
                              eos_token_id=2, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))[0, 8:].tolist()
    out = jacobi_generate(model, ids, max_new_tokens=40, repetition_penalty=1.3, eos_token_id=2,
                          **MODES[mode])
    assert out.tokens == expected and len(expected) >= 10


def test_greedy_ignores_top_p_and_top_k(model):
    config = JacobiConfig(temperature=1e-6, top_p=0.5, top_k=3, max_new_tokens=40, window_size=6)
    assert isinstance(acceptance_rule(config, torch.tensor([1])), GreedyRule)
    ids = prompt(8, seed=6)
    assert jacobi_generate(model, ids, config).tokens == ar_greedy(model, ids, 40)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(top_k=2.5), dict(repetition_penalty=0.0),
                                 dict(repetition_penalty=float("inf")), dict(logprobs=-1),
                                 dict(logprobs=True), dict(temperature="hot"),
                                 dict(acceptance="metropolis")])
def test_bad_sampling_settings_raise(bad):
    with pytest.raises(ValueError):
        JacobiConfig(**bad)

"""OpenAI's logit_bias inside Jacobi decoding: greedy output equals transformers' greedy generate
with the same bias (`sequence_bias` of single tokens), sampling keeps the biased distribution."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper)

from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.core.sampling import bias_vector, process_logits
from harness import (PROMPT, ar_distribution, ar_greedy, chi_square_p, jacobi_samples,
                     peaked_model, tiny_greedy, tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 2
MODES = {"adaptive": dict(), "sliding": dict(adaptive=False),
         "fixed": dict(adaptive=False, fixed_blocks=True)}


def random_bias(seed: int, count: int = 30, scale: float = 0.1) -> dict[int, float]:
    """`count` token ids with biases in [-scale, scale]: about the tiny models' logit spread."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(96, generator=g)[:count].tolist()
    values = (scale * (2 * torch.rand(count, generator=g, dtype=torch.float64) - 1)).tolist()
    return dict(zip(tokens, values))


def prompt(seed: int, length: int = 9) -> list[int]:
    return torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=("llama", "qwen2"))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return tiny_model(arch)


@pytest.mark.parametrize("window_size", (1, 4, 16))
@pytest.mark.parametrize("mode", MODES)
def test_greedy_with_bias_equals_generate_with_sequence_bias(arch, model, window_size, mode):
    """The references (generate with the bias as single-token sequence_bias) are computed once
    per architecture, seed and bias (tiny_greedy)."""
    changed = 0
    for seed in (1, 2, 3):
        ids, bias = prompt(seed), random_bias(seed)
        expected = tiny_greedy(arch, ids, 40, [EOS], bias=bias)
        changed += expected != tiny_greedy(arch, ids, 40, [EOS])
        out = jacobi_generate(model, ids, max_new_tokens=40, window_size=window_size,
                              eos_token_id=EOS, logit_bias=bias, **MODES[mode])
        assert out.tokens == expected
    assert changed == 3                         # every bias changed the greedy output


def test_strong_negative_bias_removes_the_first_token(arch, model):
    ids = prompt(4)
    free = jacobi_generate(model, ids, max_new_tokens=30, eos_token_id=EOS).tokens
    bias = {free[0]: -100.0}
    out = jacobi_generate(model, ids, max_new_tokens=30, eos_token_id=EOS, logit_bias=bias)
    assert free[0] not in out.tokens
    assert out.tokens == tiny_greedy(arch, ids, 30, [EOS], bias=bias)


def test_greedy_with_bias_fp64():
    model = tiny_model("mistral", dtype=torch.float64, seed=3)
    ids, bias = prompt(5, length=12), random_bias(5)
    expected = ar_greedy(model, ids, 45, [EOS], bias)
    assert expected != ar_greedy(model, ids, 45, [EOS])
    for window_size in (4, 16):
        assert jacobi_generate(model, ids, max_new_tokens=45, window_size=window_size,
                               eos_token_id=EOS, logit_bias=bias).tokens == expected


def test_bias_comes_first_then_fastchats_processors():
    """Bias, temperature, repetition penalty, top-k: as transformers orders sequence_bias first."""
    bias = {3: 6.0, 7: -1.5, 11: 4.0, 20: 8.0}
    config = JacobiConfig(temperature=0.6, repetition_penalty=1.3, top_k=20, logit_bias=bias)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 40, generator=g)                          # [L, V]
    present = torch.zeros(4, 40, dtype=torch.bool)
    present[:, [3, 7, 20]] = True
    ours = process_logits(logits, present, config, bias_vector(config, logits))
    reference = LogitsProcessorList([
        SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
        RepetitionPenaltyLogitsProcessor(config.repetition_penalty),
        TemperatureLogitsWarper(config.temperature), TopKLogitsWarper(config.top_k)])
    expected = reference(torch.tensor([[3, 7, 20]] * 4), logits.clone())  # [L, V]
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    assert finite[:, [3, 11, 20]].all()                 # the biased tokens survive top-k
    assert torch.allclose(ours[finite], expected[finite], atol=1e-5)


def test_bias_vector_keeps_half_precision_logits_exact():
    config = JacobiConfig(logit_bias={5: 0.3})
    bias = bias_vector(config, torch.zeros(2, 8, dtype=torch.bfloat16))   # [V]
    assert bias.dtype == torch.float32 and bias[5] == torch.tensor(0.3) and bias.sum() == bias[5]
    assert bias_vector(JacobiConfig(), torch.zeros(2, 8)) is None


@pytest.mark.parametrize("bias, message", [
    ({-1: 1.0}, "logit_bias token id must be >= 0"),
    ({"3": 1.0}, "logit_bias token id must be an integer"),
    ({3: float("nan")}, "logit_bias value must be a finite number"),
    ({3: "1"}, "logit_bias value must be a finite number"),
    (((3, 1.0), (3, 2.0)), "names a token id twice"),
    ((3, 1.0), "logit_bias must map token ids to biases"),
])
def test_bad_bias_is_refused(bias, message):
    with pytest.raises(ValueError, match=message):
        JacobiConfig(logit_bias=bias)


def test_bias_is_normalised_and_checked_against_the_vocabulary():
    config = JacobiConfig(logit_bias={9: 1, 4: -2.5})
    assert config.logit_bias == ((4, -2.5), (9, 1.0))
    assert hash(config) == hash(JacobiConfig(logit_bias=[(4, -2.5), (9, 1.0)]))
    with pytest.raises(ValueError, match="outside the vocabulary of 96"):
        jacobi_generate(tiny_model(), [5, 6], max_new_tokens=3, logit_bias={96: 1.0})


BIASED = dict(temperature=0.8, top_k=4, repetition_penalty=1.1,
              logit_bias={1: -3.0, 9: 2.0, 4: 1.0})
SAMPLES, NEW_TOKENS = 2000, 3


def biased_law(model, settings: dict) -> dict[tuple, float]:
    bias = {(t,): b for t, b in settings.get("logit_bias", {}).items()}
    processors = LogitsProcessorList([
        *([SequenceBiasLogitsProcessor(bias)] if bias else []),
        RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]),
        TemperatureLogitsWarper(settings["temperature"]), TopKLogitsWarper(settings["top_k"])])
    return ar_distribution(model, PROMPT, NEW_TOKENS, processors)


@pytest.mark.parametrize("acceptance", ["gumbel", "speculative"])
def test_sampling_keeps_the_biased_distribution(acceptance):
    model = peaked_model()
    law = biased_law(model, BIASED)
    unbiased = biased_law(model, {k: v for k, v in BIASED.items() if k != "logit_bias"})
    distance = sum(abs(law.get(s, 0) - unbiased.get(s, 0)) for s in {*law, *unbiased}) / 2
    assert distance > 0.3                   # a sampler that ignored the bias would fail the fit
    counts, accepted, _ = jacobi_samples(model, acceptance, BIASED, SAMPLES, NEW_TOKENS)
    p_value = chi_square_p(counts, law, SAMPLES)
    print(f"\nchi-square p-value (biased, {acceptance}) = {p_value:.4f}; outcomes {len(law)}, "
          f"total variation to the unbiased law {distance:.2f}, guesses accepted {accepted}")
    assert accepted > SAMPLES // 20 and p_value > 1e-3

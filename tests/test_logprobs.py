"""Logprobs of final tokens equal log_softmax of a plain forward pass over the final text."""
from __future__ import annotations

import pytest
import torch

from harness import chat_ids, forward_logprobs, tiny_model
from fastchat_cllm import jacobi_generate, jacobi_stream


def check(out, expected: torch.Tensor, top: int, atol: float) -> None:
    assert [lp.token for lp in out.logprobs] == out.tokens
    picked = expected.gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    assert torch.allclose(got, picked, atol=atol), (got - picked).abs().max()
    for lp, row in zip(out.logprobs, expected):
        assert len(lp.top) == top
        values = torch.tensor([value for _, value in lp.top])
        assert torch.allclose(values, row.topk(top).values, atol=atol)
        assert all(abs(float(row[tok]) - value) <= atol for tok, value in lp.top)
        assert list(values) == sorted(values, reverse=True)


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.8, top_p=0.9, top_k=8),
                                      dict(temperature=0.6, repetition_penalty=1.3)])
@pytest.mark.parametrize("block", [dict(window_size=1), dict(window_size=6, adaptive=False),
                                   dict(window_size=16)])
def test_tiny_model_logprobs(settings, block):
    model = tiny_model("llama", seed=4)
    prompt = list(range(10, 19))
    out = jacobi_generate(model, prompt, max_new_tokens=30, logprobs=3, seed=1, **settings, **block)
    check(out, forward_logprobs(model, prompt, out.tokens), 3, atol=1e-4)


def test_logprobs_off_and_zero_alternatives():
    model = tiny_model("mistral", seed=4)
    off = jacobi_generate(model, [5, 6, 7], max_new_tokens=12, temperature=0.8)
    assert off.logprobs is None
    assert all(step.logprobs is None for step in jacobi_stream(model, [5, 6, 7], max_new_tokens=4))
    bare = jacobi_generate(model, [5, 6, 7], max_new_tokens=12, temperature=0.8, logprobs=0)
    assert bare.tokens == off.tokens and [lp.top for lp in bare.logprobs] == [()] * 12


def test_stream_steps_carry_logprobs_of_their_tokens():
    model = tiny_model("qwen2", seed=4)
    steps = list(jacobi_stream(model, [9, 8, 7, 6], max_new_tokens=20, window_size=5,
                               adaptive=False, temperature=0.7, logprobs=1))
    assert all([lp.token for lp in step.logprobs] == step.tokens for step in steps)


@pytest.mark.parametrize("prompt", [[7], list(range(10, 19))])
def test_prompt_logprobs_equal_a_plain_forward(prompt):
    model = tiny_model("llama", seed=4)
    out = jacobi_generate(model, prompt, max_new_tokens=9, logprobs=2, prompt_logprobs=True,
                          temperature=0.7, seed=2)
    plain = jacobi_generate(model, prompt, max_new_tokens=9, logprobs=2, temperature=0.7, seed=2)
    assert out.tokens == plain.tokens
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(
        [lp.logprob for lp in plain.logprobs], abs=1e-5)
    assert plain.prompt_logprobs is None
    expected = forward_logprobs(model, prompt[:1], prompt[1:] + out.tokens)[: len(prompt) - 1]
    assert [lp.token for lp in out.prompt_logprobs] == prompt[1:]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs])
    assert torch.allclose(got, expected.gather(1, torch.tensor(prompt[1:], dtype=torch.long)[:, None])[:, 0],
                          atol=1e-4)
    assert all(len(lp.top) == 2 for lp in out.prompt_logprobs)
    with pytest.raises(ValueError, match="prompt_logprobs needs logprobs"):
        jacobi_generate(model, prompt, max_new_tokens=2, prompt_logprobs=True)


@pytest.mark.slow
def test_smollm2_sampled_logprobs(smollm2):
    model, tokenizer = smollm2
    prompt = chat_ids(tokenizer, "Name three colours of the rainbow.")
    out = jacobi_generate(model, prompt, max_new_tokens=24, window_size=8, adaptive=False,
                          temperature=0.7, top_p=0.9, seed=3, logprobs=2,
                          eos_token_id=tokenizer.eos_token_id)
    check(out, forward_logprobs(model, prompt, out.tokens), 2, atol=2e-3)

"""The real SmolLM2-135M-Instruct (GGUF, fp32, CPU): Jacobi output equals greedy generate."""
from __future__ import annotations

import pytest

from harness import ar_greedy, chat_ids
from fastchat_cllm import jacobi_generate

QUESTIONS = ("What is the capital of France? Answer in one sentence.",
             "Write a Python function that returns the factorial of n.",
             "Tom has 3 apples and buys 5 more. How many apples does he have?")


@pytest.fixture(scope="module")
def greedy(smollm2):
    """Per question: its chat prompt ids and transformers' greedy answer (computed once)."""
    model, tokenizer = smollm2
    eos = [tokenizer.eos_token_id]
    references = {}
    for question in QUESTIONS:
        ids = chat_ids(tokenizer, question)
        references[question] = ids, ar_greedy(model, ids, 40, eos=eos)
    return references


@pytest.mark.parametrize("options", [dict(), dict(window_size=4, adaptive=False),
                                     dict(window_size=16, adaptive=False, fixed_blocks=True,
                                          fill="random")],
                         ids=["adaptive", "sliding-4", "reference-16"])
def test_smollm2_jacobi_equals_greedy(smollm2, greedy, options):
    model, tokenizer = smollm2
    eos = [tokenizer.eos_token_id]
    for ids, expected in greedy.values():
        out = jacobi_generate(model, ids, max_new_tokens=40, eos_token_id=eos, **options)
        assert out.tokens == expected, tokenizer.decode(out.tokens)
        assert 1.0 <= out.stats.tokens_per_forward <= 16

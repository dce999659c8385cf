"""count_prompt_tokens: exact for prompts within the limit, fast and above it for huge ones
(SmolLM2's tokenizer)."""
from __future__ import annotations

import time

import pytest

from harness import chat_ids
from fastchat_cllm.serving.counting import count_prompt_tokens, max_chars_per_token

pytestmark = pytest.mark.slow
LIMIT = 8192


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def test_short_prompts_are_counted_exactly(tokenizer):
    chat = tokenizer.decode(chat_ids(tokenizer, "What is the capital of France?"))
    for text in ("", "x", "hello world", chat, "déjà vu 🙂 " * 50, "<|im_start|>" * 30):
        assert count_prompt_tokens(tokenizer, text, LIMIT) == len(tokenizer(text).input_ids)


def test_a_prompt_just_over_the_limit_is_counted_exactly(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 120
    exact = len(tokenizer(text).input_ids)
    assert count_prompt_tokens(tokenizer, text, exact - 5) == exact
    assert count_prompt_tokens(tokenizer, text, exact) == exact


def test_huge_prompts_count_above_the_limit_fast(tokenizer):
    max_chars_per_token(tokenizer)                               # computed once per tokenizer
    longest = max(tokenizer.batch_decode([[t] for t in range(len(tokenizer))]), key=len)
    for piece in ("The quick brown fox jumps over the lazy dog. ", "x", longest):
        text = piece * (20_000_000 // len(piece))
        started = time.perf_counter()
        count = count_prompt_tokens(tokenizer, text, LIMIT)
        seconds = time.perf_counter() - started
        assert count > LIMIT and seconds < 1.0, (piece, count, seconds)

"""Counting a prompt's tokens against a limit without tokenizing all of a huge prompt.

The API server asks the worker how many tokens a prompt has to check it against the context.
Tokenizing a 20 MB prompt takes tens of seconds, yet only the answer "more than the limit"
matters then. No token stands for more characters of text than the longest text one token
decodes to (plus one: a decoder may drop a word-start space from a token decoded alone), so
a prefix of (limit + 2) times that many characters already has more than `limit` tokens.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def max_chars_per_token(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` stands for (an upper bound)."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))],
                                   skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return max(map(len, texts)) + 1


def count_prompt_tokens(tokenizer, text: str, limit: int) -> int:
    """len(tokenizer(text).input_ids) when that is at most `limit`, else a count above `limit`
    (the tokens of a long enough prefix of `text`)."""
    prefix = text[: (limit + 2) * max_chars_per_token(tokenizer)]
    count = len(tokenizer(prefix).input_ids)
    if len(prefix) < len(text) and count <= limit:   # the bound failed: count exactly
        count = len(tokenizer(text).input_ids)
    return count

"""The guesses of a window: carried predictions, n-gram pool proposals, fills."""
from __future__ import annotations

import random

from .ngram_pool import NGramPool


class Context:
    """The token sequence so far (prompt + final output) with what the guesses need of it.

    `successor` maps a token to the token that followed its latest occurrence: a bigram table
    that the "lookup" fill walks to continue the context's own patterns. `pool`, when on, holds
    n-grams of the context and of the engine's own predictions (lookahead-style).
    """

    def __init__(self, prompt: list[int], seed: int, pool: NGramPool | None = None):
        self.tokens: list[int] = []
        self.successor: dict[int, int] = {}
        self.rng = random.Random(seed)
        self.pool = pool
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        """Append final tokens."""
        prev = self.tokens[-1] if self.tokens else None
        for tok in tokens:
            if prev is not None:
                self.successor[prev] = tok
            prev = tok
        if self.pool is not None:   # the n-grams that end in the new tokens
            self.pool.add(self.tokens[-(self.pool.n - 1):] + tokens)
        self.tokens.extend(tokens)

    def observe(self, predicted: list[int]) -> None:
        """Feed a predicted continuation (next token + carried guesses) to the pool."""
        if self.pool is not None:
            self.pool.add(predicted)


def fill(kind: str, context: Context, last: int, count: int) -> list[int]:
    """`count` guesses to follow token `last` (the last token of the window so far)."""
    if count <= 0:
        return []
    if kind == "random":
        return [context.rng.choice(context.tokens) for _ in range(count)]
    out = []
    for _ in range(count):
        last = context.successor.get(last, last)
        out.append(last)
    return out


def window_guesses(kind: str, context: Context, next_token: int, carried: list[int],
                  count: int) -> list[int]:
    """`count` guesses after `next_token`: a pool proposal when there is one, else the carried
    predictions (Jacobi), then fills for what is left."""
    proposal = context.pool.propose(next_token, count) if context.pool is not None else []
    guesses = proposal if len(proposal) > len(carried[:count]) else carried[:count]
    return guesses + fill(kind, context, guesses[-1] if guesses else next_token,
                          count - len(guesses))

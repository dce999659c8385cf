"""The guesses of a window: context lookups, carried predictions, n-gram pool proposals, fills."""
from __future__ import annotations

import random

from .ngram_pool import NGramPool


class Context:
    """The token sequence so far (prompt + final output) with what the guesses need of it.

    `successor` maps a token to the token that followed its latest occurrence: a bigram table
    that the "lookup" fill walks to continue the context's own patterns. `follower` maps each
    n-gram of 2..`lookup` tokens to the position after its latest occurrence that has a
    follower, for `lookup` (prompt-lookup guesses). `pool`, when on, holds n-grams of the
    context and of the engine's own predictions (lookahead-style).
    """

    def __init__(self, prompt: list[int], seed: int, pool: NGramPool | None = None,
                 lookup: int = 0):
        self.tokens: list[int] = []
        self.successor: dict[int, int] = {}
        self.follower: dict[tuple[int, ...], int] = {}
        self.lookup_sizes = range(lookup, 1, -1)        # longest first
        self.rng = random.Random(seed)
        self.pool = pool
        self.matched: tuple[int, int | None] = (-1, None)    # (len(tokens), match_start())
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
        for tok in tokens:          # the n-grams ending before `tok` now have a follower
            i = len(self.tokens)
            for n in self.lookup_sizes:
                if i >= n:
                    self.follower[tuple(self.tokens[i - n:])] = i
            self.tokens.append(tok)

    def match_start(self) -> int | None:
        """Where the tokens that followed the latest earlier occurrence of the context's longest
        matching suffix (2..`lookup` tokens) begin; None when none occurred before. Found once
        per context length (a window asks for its size, its guesses and its shadow guess)."""
        if self.matched[0] != len(self.tokens):
            start = None
            for n in self.lookup_sizes:
                start = self.follower.get(tuple(self.tokens[-n:]))
                if start is not None:
                    break
            self.matched = (len(self.tokens), start)
        return self.matched[1]

    def lookup(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the context's
        longest matching suffix (2..`lookup` tokens); [] when none occurred before."""
        start = self.match_start()
        return [] if start is None else self.tokens[start:start + count]

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
    """`count` guesses after `next_token` (the context's last token): what followed the
    context's suffix before when it occurred before (prompt lookup), else a pool proposal
    when there is one longer than the carried predictions, else these (Jacobi), then fills
    for what is left."""
    guesses = context.lookup(count) if count > 0 else []
    if guesses and carried[:len(guesses)] == guesses:   # the same so far: Jacobi's go further
        guesses = carried[:count]
    if not guesses:
        proposal = context.pool.propose(next_token, count) if context.pool is not None else []
        guesses = proposal if len(proposal) > len(carried[:count]) else carried[:count]
    return guesses + fill(kind, context, guesses[-1] if guesses else next_token,
                          count - len(guesses))

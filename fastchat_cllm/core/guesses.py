"""Initial guesses for block positions that have no previous prediction."""
from __future__ import annotations

import random


class Context:
    """The token sequence so far (prompt + final output) with what the fills need of it.

    `successor` maps a token to the token that followed its latest occurrence: a bigram table
    that the "lookup" fill walks to continue the context's own patterns.
    """

    def __init__(self, prompt: list[int], seed: int):
        self.tokens: list[int] = []
        self.successor: dict[int, int] = {}
        self.rng = random.Random(seed)
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        prev = self.tokens[-1] if self.tokens else None
        for tok in tokens:
            if prev is not None:
                self.successor[prev] = tok
            prev = tok
        self.tokens.extend(tokens)


def fill(kind: str, context: Context, last: int, count: int) -> list[int]:
    """`count` guesses to follow token `last` (the last token of the block so far)."""
    if count <= 0:
        return []
    if kind == "random":
        return [context.rng.choice(context.tokens) for _ in range(count)]
    out = []
    for _ in range(count):
        last = context.successor.get(last, last)
        out.append(last)
    return out

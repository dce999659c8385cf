"""A bounded pool of n-grams (lookahead decoding's pool), fed by the context and by the
engine's own Jacobi predictions, proposing continuations of the newest final token."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class NGramPool:
    """Up to `max_keys` first tokens, each with its `per_key` most recent (n-1)-token
    continuations; the least recently fed key is evicted first."""

    def __init__(self, n: int, max_keys: int, per_key: int = 4):
        if n < 2 or max_keys < 1 or per_key < 1:
            raise ValueError(f"n-gram pool needs n >= 2, max_keys >= 1, per_key >= 1 "
                             f"(got {n}, {max_keys}, {per_key})")
        self.n, self.max_keys, self.per_key = n, max_keys, per_key
        self.pool: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()

    def __len__(self) -> int:
        """Number of n-grams held."""
        return sum(len(conts) for conts in self.pool.values())

    def add(self, tokens: Sequence[int]) -> None:
        """Feed every n-gram of `tokens` (later ones become the most recent)."""
        for i in range(len(tokens) - self.n + 1):
            self._put(tokens[i], tuple(tokens[i + 1: i + self.n]))

    def _put(self, key: int, continuation: tuple[int, ...]) -> None:
        conts = self.pool.pop(key, [])
        if continuation in conts:
            conts.remove(continuation)
        conts.insert(0, continuation)
        del conts[self.per_key:]
        self.pool[key] = conts
        while len(self.pool) > self.max_keys:
            self.pool.popitem(last=False)

    def propose(self, last: int, count: int) -> list[int]:
        """Up to `count` tokens to follow `last`, chaining the most recent continuations."""
        out: list[int] = []
        while len(out) < count and last in self.pool:
            out.extend(self.pool[last][0])
            last = out[-1]
        return out[:count]

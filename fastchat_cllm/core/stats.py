"""Exact per-call statistics of a Jacobi decoding run (vocabulary as in the CLLM paper)."""
from __future__ import annotations

from dataclasses import dataclass, field


def tokens_per_forward(accepted: int, forwards: int) -> float:
    """Tokens per forward, the one definition (engine, worker usage, benchmark, evaluation):
    tokens made final by the forwards after the prefill, divided by those forwards; 1.0 is
    autoregressive decoding, 0.0 when no forward followed the prefill.

    The prefill's forward makes the first token and is not counted. Seen from outside, a decoder
    that produced n tokens in c calls of the model (the prefill one of them) has accepted = n - 1
    and forwards = c - 1.
    """
    return accepted / forwards if forwards else 0.0


@dataclass
class JacobiStats:
    """Counts of one call.

    forwards: model forward calls after the prefill.
    tokens: tokens generated (the first comes from the prefill, the rest from forwards).
    accepted_per_forward: tokens each forward made final (1 = no gain over autoregressive).
    window_sizes: the window each forward ran.
    fast_forwarded: guesses accepted, i.e. tokens gained beyond one per forward.
    stationary: accepted guesses that were already right (and stayed so) in the forward before
        the one that accepted them, while an earlier position was still wrong.
    iterations_per_block: forwards each block took to reach its fixed point (fixed blocks), or,
        for a sliding window, forwards each token spent in the window before it was accepted.
    """

    forwards: int = 0
    tokens: int = 0
    accepted_per_forward: list[int] = field(default_factory=list)
    window_sizes: list[int] = field(default_factory=list)
    fast_forwarded: int = 0
    stationary: int = 0
    iterations_per_block: list[int] = field(default_factory=list)

    def record_forward(self, size: int, accepted: int, ages: list[int]) -> None:
        """A forward over a window of `size` that accepted `accepted` positions; ages[i]: how
        many forwards the guess at position i had kept its value."""
        self.forwards += 1
        self.accepted_per_forward.append(accepted)
        self.window_sizes.append(size)
        self.fast_forwarded += accepted - 1
        self.stationary += sum(1 for age in ages[1:accepted] if age >= 1)

    @property
    def tokens_per_forward(self) -> float:
        """See tokens_per_forward (module level): accepted tokens over forwards after the prefill."""
        return tokens_per_forward(sum(self.accepted_per_forward), self.forwards)

    @property
    def mean_iterations_per_block(self) -> float:
        blocks = self.iterations_per_block
        return sum(blocks) / len(blocks) if blocks else 0.0

    def summary(self) -> dict:
        """A JSON-ready digest (the per-forward lists left out)."""
        return {
            "forwards": self.forwards,
            "tokens": self.tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "fast_forwarded": self.fast_forwarded,
            "stationary": self.stationary,
            "mean_window_size": round(sum(self.window_sizes) / len(self.window_sizes), 3)
            if self.window_sizes else 0.0,
            "mean_iterations_per_block": round(self.mean_iterations_per_block, 3),
        }

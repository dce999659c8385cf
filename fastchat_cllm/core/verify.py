"""Acceptance rules: which leading guesses of a window are final after one forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Verdict:
    accepted: int            # k: window[:k] are final (window[0] always is)
    next_token: int          # the final token that follows them (opens the next window)
    predictions: list[int]   # predictions[i] guesses the token at window position i + 1


def accepted_length(window: Sequence[int], predictions: Sequence[int]) -> int:
    """k: 1 + the number of leading guesses equal to the prediction one position earlier."""
    k = 1
    while k < len(window) and window[k] == predictions[k - 1]:
        k += 1
    return k


def verify_greedy(window: list[int], logits: torch.Tensor) -> Verdict:
    """Greedy rule: guess i is right when it equals the argmax at position i - 1.

    window: [L] token ids; logits: [L, V].
    """
    predictions = logits.argmax(-1).tolist()
    k = accepted_length(window, predictions)
    return Verdict(k, predictions[k - 1], predictions)

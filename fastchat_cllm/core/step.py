"""One request's decoding pieces between forwards: what a forward made final (Step), the
window bookkeeping (blocks, guesses' ages, the next window) and where decoding ends.

Invariant of the loop: the cache holds the prompt and every final token except `next_token`,
the newest final token, which opens the next window. A forward over the window
[next_token, g_1 .. g_{n-1}] predicts p_0 .. p_{n-1}; g_i is right when g_i == p_{i-1}, so the
k - 1 leading right guesses are final, and so is p_{k-1} (the model's exact next token after them).
The keys/values of the n - k positions after them are dropped; p_k .. are carried as the guesses
for the positions they predict.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import JacobiConfig
from .guesses import Context, window_guesses
from .logprobs import TokenLogprob
from .stats import JacobiStats
from .window_size import WindowSizer


@dataclass(frozen=True)
class Step:
    """What one forward (or the prefill, with an empty `window`) made final."""

    tokens: list[int]          # new final tokens, cut after an EOS and at max_new_tokens
    window: list[int]          # the window this forward ran: [next_token, guesses...]
    predictions: list[int]     # prediction at each position (greedy, or sampled: sampling.py)
    accepted: int              # k: window[:k] are final (their keys/values stay cached)
    block_start: bool          # first forward of a block (fixed blocks) / of a call
    finish_reason: str | None  # "stop" (EOS), "length" (max_new_tokens) or None
    stats: JacobiStats         # the call's statistics so far (one object, updated in place)
    logprobs: list[TokenLogprob] | None = None  # one per token in `tokens` (config.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # prefill only: prompt tokens 2.. (config)


def carried_ages(window: list[int], ages: list[int], predictions: list[int], k: int) -> list[int]:
    """For the carried guesses p_k..: forwards each has kept its value at its position."""
    out = []
    for i in range(k, len(predictions)):
        same = i + 1 < len(window) and predictions[i] == window[i + 1]
        out.append(ages[i + 1] + 1 if same else 0)
    return out


@dataclass
class Blocks:
    """Block bookkeeping: the next window's size and the forwards each block took.

    Fixed blocks (the reference's) run the `left` positions of a block until all are accepted;
    for a sliding window, every window_size accepted tokens count as one block, so that
    iterations per block compare with the reference's."""

    fixed: bool
    window_size: int
    left: int = 0          # fixed: positions of the current block not yet accepted
    produced: int = 0      # sliding: tokens accepted since the last block boundary
    forwards: int = 0      # forwards in the current block

    def next_size(self, sizer: WindowSizer, room: int) -> tuple[int, bool]:
        """(the next window's size, whether a fixed block starts with it)."""
        if not self.fixed:
            return sizer.next_size(room), False
        fresh = self.left == 0
        if fresh:
            self.left = sizer.next_size(room)
        return self.left, fresh

    def accepted(self, k: int) -> int | None:
        """Count a forward that accepted k tokens; the block's forwards when it just ended."""
        self.forwards += 1
        if self.fixed:
            self.left -= k
            done = self.left == 0
        else:
            self.produced += k
            done = self.produced >= self.window_size
            self.produced -= self.window_size if done else 0
        if not done:
            return None
        forwards, self.forwards = self.forwards, 0
        return forwards


def make_window(fill: str, context: Context, next_token: int, carried: list[int],
                carried_ages: list[int], size: int) -> tuple[list[int], list[int]]:
    """The window [next_token, guesses...] ([size]) and each position's age: how many forwards
    its guess has kept its value (0 for next_token and fresh guesses)."""
    guesses = window_guesses(fill, context, next_token, carried, size - 1)
    ages = [0] + [carried_ages[i] if i < len(carried) and guesses[i] == carried[i] else 0
                  for i in range(size - 1)]
    return [next_token] + guesses, ages


def finish(tokens: list[int], config: JacobiConfig, produced: int) -> tuple[list[int], str | None]:
    """Cut `tokens` after the first EOS and at the token budget; say why decoding ends."""
    for i, tok in enumerate(tokens):
        if tok in config.eos_token_id:
            return tokens[: i + 1], "stop"
    room = config.max_new_tokens - produced
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None

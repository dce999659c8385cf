"""One request's decoding state: its prompt, final tokens, window, guesses and their ages,
acceptance rule, window sizer and statistics; it turns its logits rows of a forward into a Step.

The loop invariant of step.py: the slot holds the prompt and every final token except
`next_token`, which opens the next window [next_token, guesses...]. The prompt goes in chunks;
the last chunk's last row gives the first token.
"""
from __future__ import annotations

import torch

from ..config import JacobiConfig
from ..guesses import Context
from ..step import Blocks, Step, carried_ages, finish, make_window
from ..logprobs import TokenLogprob, token_logprobs
from ..sampling import acceptance_rule
from ..stats import JacobiStats
from ..window_size import WindowSizer
from .runner import Row


class Request:
    def __init__(self, request_id: int, prompt: list[int], config: JacobiConfig, device,
                 cost_kind: str | None = None):
        self.id, self.prompt, self.config = request_id, prompt, config
        self.slot: int | None = None
        self.prefilled = 0                      # prompt tokens in the slot
        self.cached = 0                         # of them, found there (prefix caching)
        self.output: list[int] = []             # final tokens
        self.finish_reason: str | None = None
        self.error: BaseException | None = None   # what stopped it, when decoding it raised
        self.stats = JacobiStats()
        lookup = 0 if config.fixed_blocks else config.prompt_lookup   # blocks iterate as Jacobi
        self.context = Context(prompt, config.seed, config.make_pool(), lookup)
        self.sizer = WindowSizer(config.min_window_size, config.window_size, config.adaptive,
                                 config.window_cost, cost_kind or torch.device(device).type)
        self.rule = acceptance_rule(config, torch.tensor(prompt, device=device))
        self.blocks = Blocks(config.fixed_blocks, config.window_size)
        self.prompt_logprobs: list[TokenLogprob] = []
        self.next_token: int | None = None
        self.guesses: list[int] = []            # carried predictions for the next window
        self.ages: list[int] = []               # ages[i]: forwards guesses[i] kept its value
        self.window: list[int] = []             # the window of the forward in flight
        self.window_ages: list[int] = []
        self.grown = False                      # a lookup grew the window past the sizer's size
        self.shadow_guess: int | None = None     # see window_row
        self.block_start = True                 # the first forward of a call starts a block

    def start_from(self, cached: int) -> None:
        """The slot already holds the first `cached` prompt tokens: prefill the rest."""
        if not 0 <= cached < len(self.prompt) or self.prefilled:
            raise ValueError(f"cannot start from {cached} of {len(self.prompt)} prompt tokens")
        self.prefilled = self.cached = cached

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def prefill_row(self, budget: int) -> Row:
        """The next chunk of the prompt, at most `budget` tokens (> 0)."""
        piece = self.prompt[self.prefilled: self.prefilled + budget]
        last = self.prefilled + len(piece) == len(self.prompt)
        if self.config.prompt_logprobs:
            keep = range(len(piece))
        else:
            keep = range(len(piece) - 1, len(piece)) if last else range(0)
        return Row(self.slot, piece, keep)

    @property
    def sized_by_batch(self) -> bool:
        """Whether the engine chooses this request's window when it shares a forward (an
        adaptive sliding window; fixed sizes and the reference's fixed blocks size themselves)."""
        return self.config.adaptive and not self.config.fixed_blocks

    @property
    def tokens_left(self) -> int:
        return self.config.max_new_tokens - self.stats.tokens

    def window_row(self, size: int | None = None) -> Row:
        """The next Jacobi window [next_token, guesses...]: its size (the sizer's, or `size`
        chosen for a batch; an adaptive window grows to take a lookup's proposal), guesses and
        their ages."""
        if size is None or not self.sized_by_batch:
            size, fresh = self.blocks.next_size(self.sizer, self.tokens_left)
        else:
            fresh = False
        chosen = size
        if self.sized_by_batch:                 # a lookup's guesses may widen the window
            size = max(size, self.lookup_size())
        self.grown = size > chosen
        if fresh:
            self.guesses, self.ages = [], []
        self.block_start = self.block_start or fresh
        # a 1-token window: the guess a window of 2 would carry, checked for free when the token
        # arrives (the lookup fill is deterministic; a random fill would move the seeded stream)
        shadow = size == 1 and self.config.adaptive and self.config.fill == "lookup"
        window, ages = make_window(self.config.fill, self.context, self.next_token,
                                   self.guesses, self.ages, 2 if shadow else size)
        self.shadow_guess = window[1] if shadow else None
        self.window, self.window_ages = window[:size], ages[:size]
        return Row(self.slot, self.window, range(size))

    def lookup_size(self) -> int:
        """The window that takes all the guesses the context lookup proposes (1: none), at most
        `lookup_window` (and window_size, and the tokens left)."""
        cap = min(self.config.lookup_window, self.config.window_size, self.tokens_left)
        return 1 + len(self.context.lookup(cap - 1)) if cap > 1 else 1

    def advance(self, row: Row, logits: torch.Tensor, seconds: float | None) -> Step | None:
        """Take this request's logits [len(row.keep), V] of a forward; the Step it made (None
        for a prompt chunk that is not the last)."""
        if self.prefilling:
            return self.prefilled_chunk(row, logits)
        return self.verified(logits, seconds)

    def prefilled_chunk(self, row: Row, logits: torch.Tensor) -> Step | None:
        start = self.prefilled
        self.prefilled += len(row.tokens)
        if self.config.prompt_logprobs:      # row i predicts prompt token start + i + 1
            predicted = self.prompt[start + 1: self.prefilled + 1]
            self.prompt_logprobs += token_logprobs(logits, predicted, self.config.logprobs)
        if self.prefilling:
            return None
        first = self.rule.verify(self.prompt[-1:], logits[-1:]).next_token   # logits[-1:]: [1, V]
        tokens = self.made_final([first])
        self.next_token = first
        return Step(tokens, [], [], 0, True, self.finish_reason, self.stats,
                    token_logprobs(logits[-1:], tokens, self.config.logprobs),
                    self.prompt_logprobs if self.config.prompt_logprobs else None)

    def verified(self, logits: torch.Tensor, seconds: float | None) -> Step:
        """Verify the window in flight against its logits [size, V]. `seconds`: the forward's
        time when this window ran alone (None in a batch, priced by the engine instead)."""
        window, ages, size = self.window, self.window_ages, len(self.window)
        verdict = self.rule.verify(window, logits)
        k, predictions = verdict.accepted, verdict.predictions
        if self.shadow_guess is not None:
            self.sizer.shadow(self.shadow_guess == verdict.next_token)
        self.sizer.observe(size, k, seconds, sized=not self.grown)
        self.stats.record_forward(size, k, ages)
        tokens = self.made_final(window[1:k] + [verdict.next_token])
        block_forwards = self.blocks.accepted(k)
        if block_forwards is not None:
            self.stats.iterations_per_block.append(block_forwards)
        step = Step(tokens, window, predictions, k, self.block_start, self.finish_reason,
                    self.stats, token_logprobs(logits, tokens, self.config.logprobs))
        self.block_start = False
        self.next_token = verdict.next_token
        end = size - 1 if self.config.fixed_blocks else size    # a fixed block never grows
        self.guesses = predictions[k:end]
        self.ages = carried_ages(window, ages, predictions, k)[: len(self.guesses)]
        self.context.observe([self.next_token] + self.guesses)
        return step

    def fail(self, error: BaseException) -> None:
        """Stop on `error` (the engine reports it and frees the slot)."""
        self.error, self.finish_reason = error, "error"

    def made_final(self, tokens: list[int]) -> list[int]:
        """Cut new final tokens at EOS / the budget, record them; the ones kept."""
        tokens, self.finish_reason = finish(tokens, self.config, self.stats.tokens)
        self.stats.tokens += len(tokens)
        self.output += tokens
        self.context.extend(tokens)
        self.rule.commit(tokens)
        return tokens

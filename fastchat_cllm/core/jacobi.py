"""KV-cached Jacobi decoding: guess a window, run it once, keep the prefix that is a fixed point.

One generator (`jacobi_stream`) does the decoding; `jacobi_generate` and every other consumer
(the FastChat worker, trajectory collection, the benchmark) drain it.

Invariant of the loop: the cache holds the prompt and every final token except `next_token`,
the newest final token, which opens the next window. A forward over the window
[next_token, g_1 .. g_{n-1}] predicts p_0 .. p_{n-1}; g_i is right when g_i == p_{i-1}, so the
k - 1 leading right guesses are final, and so is p_{k-1} (the model's exact next token after them).
The keys/values of the n - k positions after them are dropped; p_k .. are carried as the guesses
for the positions they predict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from . import kv_cache
from .window_size import WindowSizer
from .config import JacobiConfig
from .guesses import Context, window_guesses
from .logprobs import TokenLogprob, token_logprobs
from .sampling import acceptance_rule
from .stats import JacobiStats


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


@dataclass(frozen=True)
class JacobiResult:
    tokens: list[int]
    stats: JacobiStats
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


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


def _prompt_tensor(model, input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty sequence, got shape {tuple(ids.shape)}")
    return ids.to(model.device)


def jacobi_stream(model, input_ids, config: JacobiConfig | None = None, **options) -> Iterator[Step]:
    """Decode with Jacobi iterations, yielding a Step per forward (prefill first).

    Greedy by default; with config.temperature > 0 it samples exactly from the autoregressive
    distribution (see sampling.py).

    input_ids: [P] or [1, P]. Options are JacobiConfig fields (or pass `config`).
    """
    config = config or JacobiConfig(**options)
    ids = _prompt_tensor(model, input_ids)
    stats = JacobiStats()
    context = Context(ids[0].tolist(), config.seed, config.make_pool())
    sizer = WindowSizer(config.min_window_size, config.window_size, config.adaptive,
                       config.window_cost, ids.device.type)
    cache = kv_cache.new_cache(model)

    rule = acceptance_rule(config, ids[0])
    logits = kv_cache.forward(model, cache, ids, last_only=not config.prompt_logprobs)
    first = rule.verify(ids[0, -1:].tolist(), logits[-1:]).next_token      # logits[-1:]: [1, V]
    tokens, reason = finish([first], config, 0)
    stats.tokens = len(tokens)
    context.extend(tokens)
    rule.commit(tokens)
    prompt = (token_logprobs(logits[:-1], ids[0, 1:].tolist(), config.logprobs)
              if config.prompt_logprobs else None)
    yield Step(tokens, [], [], 0, True, reason, stats,
               token_logprobs(logits[-1:], tokens, config.logprobs), prompt)

    next_token, guesses, ages = first, [], []  # ages[i]: forwards guesses[i] kept its value
    blocks = Blocks(config.fixed_blocks, config.window_size)
    first_forward = True
    while reason is None:
        size, fresh_block = blocks.next_size(sizer, config.max_new_tokens - stats.tokens)
        if fresh_block:
            guesses, ages = [], []
        window, ages = make_window(config.fill, context, next_token, guesses, ages, size)

        started = time.perf_counter()
        logits = kv_cache.forward(model, cache, torch.tensor([window], device=ids.device))
        verdict = rule.verify(window, logits)                        # logits: [size, V]
        seconds = time.perf_counter() - started  # verify reads the logits back: a device sync
        k, predictions = verdict.accepted, verdict.predictions
        kv_cache.drop_last(cache, size - k)
        sizer.observe(size, k, seconds)
        stats.record_forward(size, k, ages)

        tokens, reason = finish(window[1:k] + [verdict.next_token], config, stats.tokens)
        stats.tokens += len(tokens)
        context.extend(tokens)
        rule.commit(tokens)
        block_forwards = blocks.accepted(k)
        if block_forwards is not None:
            stats.iterations_per_block.append(block_forwards)
        yield Step(tokens, window, predictions, k, first_forward or fresh_block, reason, stats,
                   token_logprobs(logits, tokens, config.logprobs))

        first_forward = False
        next_token = verdict.next_token
        end = size - 1 if config.fixed_blocks else size    # a fixed block never grows
        guesses = predictions[k:end]
        ages = carried_ages(window, ages, predictions, k)[: len(guesses)]
        context.observe([next_token] + guesses)


def jacobi_generate(model, input_ids, config: JacobiConfig | None = None, **options) -> JacobiResult:
    """Decode with Jacobi iterations; returns the generated tokens, statistics (and logprobs).

    Example: jacobi_generate(model, ids, max_new_tokens=64, window_size=16, eos_token_id=[2]).
    """
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    step = prompt = None
    for step in jacobi_stream(model, input_ids, config, **options):
        tokens.extend(step.tokens)
        logprobs.extend(step.logprobs or [])
        prompt = step.prompt_logprobs if prompt is None else prompt
    return JacobiResult(tokens, step.stats, step.finish_reason,
                        logprobs if step.logprobs is not None else None, prompt)

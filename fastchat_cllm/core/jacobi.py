"""KV-cached Jacobi decoding: guess a block, run it once, keep the prefix that is a fixed point.

One generator (`jacobi_stream`) does the decoding; `jacobi_generate` and every other consumer
(the FastChat worker, trajectory collection, the benchmark) drain it.

Invariant of the loop: the cache holds the prompt and every final token except `next_token`,
the newest final token, which opens the next block. A forward over the block
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
from .block_size import BlockSizer
from .config import JacobiConfig
from .guesses import Context, block_guesses
from .logprobs import TokenLogprob, token_logprobs
from .sampling import acceptance_rule
from .stats import JacobiStats


@dataclass(frozen=True)
class Step:
    """What one forward (or the prefill, with an empty `window`) made final."""

    tokens: list[int]          # new final tokens, cut after an EOS and at max_new_tokens
    window: list[int]          # the block this forward ran: [next_token, guesses...]
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
    sizer = BlockSizer(config.min_block_size, config.block_size, config.adaptive,
                       config.block_cost, ids.device.type)
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
    block_left = block_forwards = produced = 0
    block_start = True
    while reason is None:
        room = config.max_new_tokens - stats.tokens
        if config.fixed_blocks:
            if block_left == 0:
                block_left, block_start, guesses, ages = sizer.next_size(room), True, [], []
            size = block_left
        else:
            size = sizer.next_size(room)
        carried = guesses
        guesses = block_guesses(config.fill, context, next_token, carried, size - 1)
        window = [next_token] + guesses                              # [size]
        ages = [0] + [ages[i] if i < len(carried) and guesses[i] == carried[i] else 0
                      for i in range(size - 1)]

        started = time.perf_counter()
        logits = kv_cache.forward(model, cache, torch.tensor([window], device=ids.device))
        verdict = rule.verify(window, logits)                        # logits: [size, V]
        seconds = time.perf_counter() - started  # verify reads the logits back: a device sync
        k, predictions = verdict.accepted, verdict.predictions
        kv_cache.drop_last(cache, size - k)
        sizer.observe(size, k, seconds)

        stats.forwards += 1
        stats.accepted_per_forward.append(k)
        stats.block_sizes.append(size)
        stats.fast_forwarded += k - 1
        stats.stationary += sum(1 for age in ages[1:k] if age >= 1)
        tokens, reason = finish(window[1:k] + [verdict.next_token], config, stats.tokens)
        stats.tokens += len(tokens)
        context.extend(tokens)
        rule.commit(tokens)

        # A fixed block ends at its fixed point; a sliding window counts every block_size tokens.
        block_forwards += 1
        if config.fixed_blocks:
            block_left -= k
            done = block_left == 0
        else:
            produced += k
            done = produced >= config.block_size
            produced -= config.block_size if done else 0
        if done:
            stats.iterations_per_block.append(block_forwards)
            block_forwards = 0

        yield Step(tokens, window, predictions, k, block_start, reason, stats,
                   token_logprobs(logits, tokens, config.logprobs))
        block_start = False
        next_token = verdict.next_token
        end = size - 1 if config.fixed_blocks else size    # a fixed block never grows
        guesses = predictions[k:end]
        ages = carried_ages(window, ages, predictions, k)[: len(guesses)]
        context.observe([next_token] + guesses)


def jacobi_generate(model, input_ids, config: JacobiConfig | None = None, **options) -> JacobiResult:
    """Decode with Jacobi iterations; returns the generated tokens, statistics (and logprobs).

    Example: jacobi_generate(model, ids, max_new_tokens=64, block_size=16, eos_token_id=[2]).
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

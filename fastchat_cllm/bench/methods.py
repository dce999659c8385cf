"""The decoders a benchmark compares, by name, each timed and its calls of the model counted.

Names: `ar` (transformers generate, greedy, KV cache), `jacobi` (the engine's adaptive default),
`jacobi-wN` (the engine at a fixed window of N), `jacobi[-wN]-pool` (the same with the n-gram
pool on), `jacobi[-wN][-pool]-nolookup` (the same without prompt-lookup guesses: Jacobi's own
carried guesses only), `jacobi-nocache[-bN]` (re-run-everything Jacobi,
block N, default 16), `pld` (transformers prompt-lookup decoding) and `assisted` (transformers
assisted generation with a draft model). All are greedy, hence lossless up to float rounding.
The `batch[-wN][-pool][-nolookup]` methods, all prompts decoded together, are in batch.py.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from transformers import GenerationConfig

from ..core import JacobiConfig, jacobi_generate
from .nocache import nocache_generate

PLD_TOKENS = 10          # prompt_lookup_num_tokens (the value transformers' docs suggest)
NOCACHE_BLOCK = 16       # the block of the 16-token reference checkpoints
POOL_KEYS = 512          # n-gram pool size of the `-pool` methods
T = TypeVar("T")
NAME = re.compile(r"^(?:(ar|pld|assisted)|(jacobi)(?:-w(\d+))?(-pool)?(-nolookup)?"
                  r"|(jacobi-nocache)(?:-b(\d+))?)$")


@dataclass(frozen=True)
class Target:
    """What every method decodes: the prompt ids, budget and stop tokens."""

    ids: list[int]
    max_new_tokens: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]
    fast_forwarded: int | None = None   # tokens beyond one per forward (None: not measured)
    stationary: int | None = None       # Jacobi only


@dataclass(frozen=True)
class Run:
    """One timed decode: `model_calls` counts calls of the target model, the prefill included."""

    tokens: list[int]
    seconds: float
    model_calls: int
    fast_forwarded: int | None
    stationary: int | None


Decoder = Callable[[torch.nn.Module, Target], Decoded]


def _generate(model, target: Target, assistant=None, **options) -> Decoded:
    ids = torch.tensor([target.ids], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=target.max_new_tokens,
                              eos_token_id=list(target.eos_token_id) or None,
                              pad_token_id=target.pad_token_id, **options)
    extra = {"assistant_model": assistant} if assistant is not None else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         **extra)
    return Decoded(out[0, ids.shape[1]:].tolist())


def _jacobi(config: JacobiConfig) -> Decoder:
    def decode(model, target: Target) -> Decoded:
        result = jacobi_generate(model, target.ids, config.with_(
            max_new_tokens=target.max_new_tokens, eos_token_id=target.eos_token_id))
        return Decoded(result.tokens, result.stats.fast_forwarded, result.stats.stationary)
    return decode


def _nocache(block_size: int) -> Decoder:
    def decode(model, target: Target) -> Decoded:
        result = nocache_generate(model, target.ids, target.max_new_tokens, block_size,
                                  target.eos_token_id)
        return Decoded(result.tokens, result.fast_forwarded, result.stationary)
    return decode


def decoder(name: str, draft=None) -> Decoder:
    """The decoder a method name stands for; ValueError for an unknown name."""
    match = NAME.match(re.sub(r"^jacobi-b(\d)", r"jacobi-w\1", name))   # the former name
    if not match:
        raise ValueError(f"unknown method {name!r}: use ar, pld, assisted, jacobi, jacobi-wN, "
                         "jacobi[-wN][-pool][-nolookup], jacobi-nocache, jacobi-nocache-bN or "
                         "batch[-wN][-pool][-nolookup]")
    plain, _, window, pool, nolookup, _, block = match.groups()
    if plain == "ar":
        return lambda model, target: _generate(model, target)
    if plain == "pld":
        return lambda model, target: _generate(model, target, prompt_lookup_num_tokens=PLD_TOKENS)
    if plain == "assisted":
        if draft is None:
            raise ValueError("method 'assisted' needs a draft model (--draft-model)")
        return lambda model, target: _generate(model, target, assistant=draft)
    if match[6]:
        return _nocache(int(block) if block else NOCACHE_BLOCK)
    return _jacobi(_jacobi_config(window, pool, nolookup))


def _jacobi_config(window: str | None, pool: str | None, nolookup: str | None) -> JacobiConfig:
    base = JacobiConfig(ngram_pool=POOL_KEYS if pool else 0)
    base = base.with_(prompt_lookup=0) if nolookup else base
    return base if window is None else base.with_(window_size=int(window), adaptive=False)


def jacobi_config(name: str) -> JacobiConfig:
    """The engine options of a `jacobi[-wN][-pool][-nolookup]` method (budget and stop tokens
    unset)."""
    match = NAME.match(name)
    if not match or not match[2]:
        raise ValueError(f"{name!r} is not a jacobi[-wN][-pool][-nolookup] method")
    return _jacobi_config(match[3], match[4], match[5])


@contextmanager
def counting_forwards(model):
    """Count calls of `model` (a forward hook) for the duration of the block: yields [count]."""
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def timed(model, call: Callable[[], T]) -> tuple[T, float]:
    """(call(), its seconds), the model's device synchronised before and after."""
    _sync(model)
    started = time.perf_counter()
    out = call()
    _sync(model)
    return out, time.perf_counter() - started


def timed_run(decode: Decoder, model, target: Target) -> Run:
    """Decode once, timing it (device synchronised) and counting the model's calls."""
    with counting_forwards(model) as count:
        out, seconds = timed(model, lambda: decode(model, target))
    gained = out.fast_forwarded
    if gained is None and count[0]:
        gained = max(len(out.tokens) - count[0], 0)   # speculative methods: beyond 1 a forward
    return Run(out.tokens, seconds, count[0], gained, out.stationary)

"""The transformers cache API in one module (decoding calls the model in engine/runner.py; the
GPU check's forward-cost table through step_function here).

transformers renames cache arguments between releases (`past_key_values=` became `cache=` in
5.2x and the old name goes away in 5.40; `DynamicCache.crop` takes a negative count in 5.x;
`StaticCache` crops only from 5.2x, not in 5.17): when the next release moves again, this is the
file to change.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from transformers import Cache, DynamicCache, StaticCache


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache (full-attention layers, so any suffix can be cropped)."""
    return DynamicCache()


def new_static_cache(model, max_length: int) -> StaticCache:
    """A cache preallocated for `max_length` positions at fixed addresses (what compiled steps and
    CUDA graphs need); drop_last moves its length back and the next forward overwrites."""
    return StaticCache(config=model.config, max_cache_len=max_length)


def cached_length(cache: Cache) -> int:
    return int(cache.get_seq_length())   # a static cache keeps its length in a tensor


def drop_last(cache: Cache, count: int) -> None:
    """Remove the last `count` positions (rejected guesses) from every layer."""
    if count < 0 or count > cached_length(cache):
        raise ValueError(f"cannot drop {count} of {cached_length(cache)} cached positions")
    if count:
        cache.crop(-count)


@functools.lru_cache(maxsize=None)
def cache_kwarg(model_class: type) -> str:
    """The name this model class takes its cache under (transformers renames it in 5.40)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def step_function(model, cache: Cache) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B, L] -> logits [B, L, V] (model dtype), their keys/values appended to `cache`: one
    tensor in, one out, nothing looked up inside, so torch.compile can capture it whole."""
    kwargs = {cache_kwarg(type(model)): cache, "use_cache": True}
    return lambda ids: model(input_ids=ids, **kwargs).logits

"""Every call to the model and to the transformers cache API, in one module.

transformers renames cache arguments between releases (`past_key_values=` became `cache=` in
5.2x and the old name goes away in 5.40; `DynamicCache.crop` takes a negative count in 5.x):
when the next release moves again, this is the file to change.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache (full-attention layers, so any suffix can be cropped)."""
    return DynamicCache()


def cached_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def drop_last(cache: DynamicCache, count: int) -> None:
    """Remove the last `count` positions (rejected guesses) from every layer."""
    if count < 0 or count > cached_length(cache):
        raise ValueError(f"cannot drop {count} of {cached_length(cache)} cached positions")
    if count:
        cache.crop(-count)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def forward(model, cache: DynamicCache, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Run `ids` [1, L] after the cached prefix; append their keys/values to `cache`.

    Returns logits [L, V] (or [1, V] with `last_only`), in float32.
    """
    kwargs = {_cache_kwarg(type(model)): cache, "use_cache": True}
    if last_only:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, **kwargs)
    return out.logits[0].float()

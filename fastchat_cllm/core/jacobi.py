"""KV-cached Jacobi decoding of one request: guess a window, run it once, keep the prefix that is
a fixed point (the loop and its invariant: step.py and engine/request.py).

One generator (`jacobi_stream`) does the decoding, on the batched engine with one slot (one
decoding code path); `jacobi_generate` and every other consumer (the FastChat worker,
trajectory collection, the benchmark) drain it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .config import JacobiConfig
from .engine import Engine, Failure
from .logprobs import TokenLogprob
from .stats import JacobiStats
from .step import Blocks, Step, carried_ages, finish, make_window

__all__ = ["Blocks", "JacobiResult", "Step", "carried_ages", "finish", "jacobi_generate",
           "jacobi_stream", "make_window"]


@dataclass(frozen=True)
class JacobiResult:
    tokens: list[int]
    stats: JacobiStats
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


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
    ids = _prompt_tensor(model, input_ids)                       # [1, P]
    length = ids.shape[1]
    engine = Engine(model, slots=1, max_len=length + config.max_new_tokens, chunk=length)
    engine.add(ids[0], config)
    while engine.has_work:
        for _, step in engine.step():
            if isinstance(step, Failure):
                raise step.error
            yield step


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

"""Where the worker's tokens come from: the one translation of a request into an engine call.

Every request decodes with Jacobi iterations: greedy ones token for token as greedy generate,
sampled ones exactly from the autoregressive sampling distribution (fastchat_cllm/core/sampling.py),
each with a fresh seed unless the request names one.
"""
from __future__ import annotations

import secrets
from typing import Iterator, Sequence

from ..core import JacobiConfig, jacobi_stream
from ..core.engine import EngineLoop
from ..core.jacobi import Step
from .params import GenerationRequest


def engine_config(request: GenerationRequest, base: JacobiConfig,
                  stop_ids: Sequence[int]) -> JacobiConfig:
    """FastChat's parameters in the engine's terms: its greedy rule, top_k -1 = off."""
    sampled = not request.greedy
    seed = request.seed if request.seed is not None else (
        secrets.randbits(63) if sampled else base.seed)
    return base.with_(max_new_tokens=request.max_new_tokens, eos_token_id=tuple(stop_ids),
                      temperature=request.temperature if sampled else 0.0,
                      top_p=request.top_p if sampled else 1.0,
                      top_k=max(request.top_k, 0) if sampled else 0,
                      repetition_penalty=request.repetition_penalty,
                      logit_bias=request.logit_bias,
                      logprobs=request.logprobs, seed=seed,
                      prompt_logprobs=request.echo and request.logprobs is not None)


def decode_steps(model, prompt_ids: Sequence[int], request: GenerationRequest,
                 base: JacobiConfig, stop_ids: Sequence[int],
                 engine: EngineLoop | None = None) -> Iterator[Step]:
    """Decode `prompt_ids` as `request` asks: FastChat's parameters meet the engine here only.
    Each Step holds the tokens that became final together (and their logprobs when asked).
    With `engine` (the worker's shared one) the request joins its batch; without, it runs
    alone (jacobi_stream). Closing the iterator stops the request."""
    config = engine_config(request, base, stop_ids)
    if engine is None:
        return jacobi_stream(model, list(prompt_ids), config)
    return engine.submit(prompt_ids, config)

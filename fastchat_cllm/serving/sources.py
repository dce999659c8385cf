"""Where the worker's tokens come from: the one translation of a request into an engine call.

Greedy requests decode with Jacobi iterations. Until the engine samples, sampled requests (and
greedy ones with a repetition penalty) fall back to transformers' autoregressive `generate`,
streamed token by token from a thread.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from queue import Queue
from typing import Iterator, Sequence

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..core import JacobiConfig, JacobiStats, jacobi_stream
from .params import GenerationRequest


@dataclass(frozen=True)
class Batch:
    """Tokens that became final together."""

    tokens: list[int]
    finish_reason: str | None     # "stop" (a stop token), "length" or None
    stats: JacobiStats | None     # the Jacobi call's live statistics; None when sampling


def token_batches(model, prompt_ids: Sequence[int], request: GenerationRequest,
                  base: JacobiConfig, stop_ids: Sequence[int]) -> Iterator[Batch]:
    """Decode `prompt_ids` as `request` asks: FastChat's parameters meet the engine here only."""
    if request.greedy and request.repetition_penalty == 1.0:
        config = base.with_(max_new_tokens=request.max_new_tokens, eos_token_id=tuple(stop_ids))
        for step in jacobi_stream(model, list(prompt_ids), config):
            yield Batch(step.tokens, step.finish_reason, step.stats)
        return
    options = dict(do_sample=False, repetition_penalty=request.repetition_penalty)
    if not request.greedy:
        options.update(do_sample=True, temperature=request.temperature, top_p=request.top_p,
                       top_k=max(request.top_k, 0))     # 0 turns transformers' top-k off
    yield from sampled_batches(model, prompt_ids, request.max_new_tokens, stop_ids, options)


class _QueueStreamer(BaseStreamer):
    """generate() pushes the prompt, then each new token; we pass the new tokens on."""

    def __init__(self):
        self.queue: Queue = Queue()
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.queue.put(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self):
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


def sampled_batches(model, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int], options: dict) -> Iterator[Batch]:
    """transformers' generate() with `options`, one Batch per token; stops the thread when the
    consumer stops early (a stop string)."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    streamer, cancel, failure = _QueueStreamer(), threading.Event(), []

    def run():
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           eos_token_id=list(stop_ids) or None,
                           pad_token_id=stop_ids[0] if stop_ids else None,
                           streamer=streamer, stopping_criteria=StoppingCriteriaList(
                               [_Cancelled(cancel)]), **options)
        except Exception as e:   # handed to the consumer's thread, which reports it
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    produced = 0
    try:
        while (tokens := streamer.queue.get()) is not None:
            for token in tokens:
                produced += 1
                reason = ("stop" if token in stop_ids else
                          "length" if produced >= max_new_tokens else None)
                yield Batch([token], reason, None)
                if reason:
                    return
        if failure:
            raise RuntimeError(f"sampling failed: {failure[0]}") from failure[0]
    finally:
        cancel.set()

"""The worker's test hooks (README "Reliability"): environment variables that make marked
requests fail on a CPU the way real faults fail them, through the real error paths. Unset, they
change nothing.

FASTCHAT_CLLM_INJECT_OOM=MARK: a request whose prompt contains MARK fails before decoding as if
CUDA ran out of memory (the 50002 answer).
FASTCHAT_CLLM_INJECT_FAULT=MARK: a request whose prompt contains MARK fails inside the shared
engine, at its first verification: its logit bias names a token past the vocabulary (which the
worker's edge refuses in a client's request), so only that request stops (50001).
"""
from __future__ import annotations

import os

import torch

from ..core.engine import EngineLoop

INJECT_OOM = "FASTCHAT_CLLM_INJECT_OOM"
INJECT_FAULT = "FASTCHAT_CLLM_INJECT_FAULT"


def marked(params: dict, variable: str) -> bool:
    marker = os.environ.get(variable)
    return bool(marker) and marker in str(params.get("prompt", ""))


def maybe_inject_oom(params: dict) -> None:
    if marked(params, INJECT_OOM):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {INJECT_OOM} test "
                                          f"hook)")


class FaultyRequests:
    """The engine loop, submitting requests with a logit bias on token `vocab`."""

    def __init__(self, loop: EngineLoop, vocab: int):
        self.loop, self.max_len, self.vocab = loop, loop.max_len, vocab

    def submit(self, prompt_ids, config):
        return self.loop.submit(prompt_ids, config.with_(logit_bias=((self.vocab, 1.0),)))


def maybe_inject_fault(params: dict, loop: EngineLoop, vocab: int) -> EngineLoop | FaultyRequests:
    """The engine the request goes to: `loop`, or one that makes it fail (INJECT_FAULT)."""
    return FaultyRequests(loop, vocab) if marked(params, INJECT_FAULT) else loop

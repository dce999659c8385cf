"""CLLM losses over the logits [L, V] of one packed sequence (see packing.py).

consistency: mean over the trained block positions of KL(target || model), the target being the
    stop-gradient predictions on the fixed point (global) or on the next state (local).
ar: next-token cross-entropy on the clean output (the greedy output: the model's own text, so
    it keeps the distribution where it is), with label smoothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import Packed


@dataclass(frozen=True)
class Losses:
    total: torch.Tensor
    consistency: torch.Tensor
    ar: torch.Tensor

    def as_dict(self) -> dict:
        return {"loss": self.total.item(), "consistency": self.consistency.item(),
                "ar": self.ar.item()}


def consistency_loss(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """KL(target || student), averaged over block positions; targets carry no gradient."""
    if packed.student.numel() == 0:
        return logits.sum() * 0.0
    index = packed.student.to(logits.device)
    student = F.log_softmax(logits[index].float(), dim=-1)                     # [S, V]
    target = F.log_softmax(logits[packed.teacher.to(logits.device)].detach().float(), dim=-1)
    return (target.exp() * (target - student)).sum(-1).mean()


def ar_loss(logits: torch.Tensor, packed: Packed, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy of the clean output given everything before it."""
    p, c = packed.prompt_len, packed.clean_len
    labels = packed.input_ids[p:c].to(logits.device)                           # [T]
    return F.cross_entropy(logits[p - 1: c - 1].float(), labels, label_smoothing=label_smoothing)


def cllm_loss(logits: torch.Tensor, packed: Packed, ar_weight: float,
              label_smoothing: float = 0.1) -> Losses:
    consistency = consistency_loss(logits, packed)
    ar = ar_loss(logits, packed, label_smoothing)
    return Losses(consistency + ar_weight * ar, consistency, ar)

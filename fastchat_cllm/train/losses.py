"""CLLM losses over the logits [L, V] of one packed sequence (see packing.py).

consistency: mean over the trained block positions of KL(target || model), the target being the
    stop-gradient predictions on the fixed point (global) or on the next state (local).
ar: next-token cross-entropy on the clean output (the greedy output: the model's own text, so
    it keeps the distribution where it is), with label smoothing.

With `reference` (the frozen base model's logits on the clean part, e.g. a LoRA run's model with
its adapter disabled) both terms aim at the base instead of the moving student: consistency
targets are the base's predictions at the fixed point, and the AR term is KL(base || model) on
the clean output, which holds the whole next-token distribution (and so its argmax) in place.

With `hard` (teacher "greedy") both terms are cross-entropies on tokens: a noisy state's
position learns the fixed point's token (the greedy output, whose collection made it the base's
argmax there) and the AR term the greedy output itself. They aim at what a greedy CLLM needs,
the argmax: the token a sliding window can accept and the base's greedy token, whose margin the
AR term widens rather than holding a near-tie in place.
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


def _kl(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || student) over rows; the target carries no gradient."""
    target = F.log_softmax(target_logits.detach().float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (target.exp() * (target - student)).sum(-1).mean()


def consistency_loss(logits: torch.Tensor, packed: Packed,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || student), averaged over block positions; targets carry no gradient. The
    targets come from `reference` (clean-part logits) when given and they lie in the clean part."""
    if packed.student.numel() == 0:
        return logits.sum() * 0.0
    teacher = packed.teacher.to(logits.device)
    source = logits
    if reference is not None and int(teacher.max()) < packed.clean_len:
        source = reference
    return _kl(source[teacher], logits[packed.student.to(logits.device)])


def consistency_ce(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Cross-entropy of each trained state position against the fixed point's next token (the
    clean token after its target position; positions whose target is the output's last are
    skipped: nothing follows it)."""
    teacher = packed.teacher
    keep = teacher + 1 < packed.clean_len
    if not bool(keep.any()):
        return logits.sum() * 0.0
    labels = packed.input_ids[teacher[keep] + 1].to(logits.device)
    return F.cross_entropy(logits[packed.student[keep].to(logits.device)].float(), labels)


def ar_loss(logits: torch.Tensor, packed: Packed, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy of the clean output given everything before it."""
    p, c = packed.prompt_len, packed.clean_len
    labels = packed.input_ids[p:c].to(logits.device)                           # [T]
    return F.cross_entropy(logits[p - 1: c - 1].float(), labels, label_smoothing=label_smoothing)


def ar_kl_loss(logits: torch.Tensor, packed: Packed, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions over the clean output."""
    p, c = packed.prompt_len, packed.clean_len
    return _kl(reference[p - 1: c - 1], logits[p - 1: c - 1])


def cllm_loss(logits: torch.Tensor, packed: Packed, ar_weight: float,
              label_smoothing: float = 0.1, reference: torch.Tensor | None = None,
              hard: bool = False) -> Losses:
    if hard:
        consistency = consistency_ce(logits, packed)
        ar = ar_loss(logits, packed, label_smoothing)
        return Losses(consistency + ar_weight * ar, consistency, ar)
    consistency = consistency_loss(logits, packed, reference)
    ar = (ar_loss(logits, packed, label_smoothing) if reference is None
          else ar_kl_loss(logits, packed, reference))
    return Losses(consistency + ar_weight * ar, consistency, ar)

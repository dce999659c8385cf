"""Pack a prompt, its greedy output and several noisy block states into ONE training sequence.

Layout: [prompt | output (every block at its fixed point) | state_1 | state_2 | ...]. The clean
part is causal; a state of the block at output offset s sits at positions p + s .. (its true
positions, through position_ids) and attends to the clean prompt + output[:s] and causally to
itself, so its logits equal those of a separate forward over prompt + output[:s] + state. One
forward thus gives the AR loss (clean part), the fixed-point targets (clean logits at the block
positions, detached) and the predictions on every state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """A noisy state of the block at output offset `start`.

    target: None = learn the fixed point's predictions (global consistency); an int = learn
        those of segment `target` (local consistency: the next state on the trajectory).
    student: False for a segment that only serves as another segment's target.
    """

    start: int
    tokens: list[int]
    target: int | None = None
    student: bool = True


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor     # [L]
    position_ids: torch.Tensor  # [L]
    allowed: torch.Tensor       # [L, L] bool: query row may attend to key column
    prompt_len: int             # p
    clean_len: int              # p + len(output)
    student: torch.Tensor       # [S] positions whose predictions are trained
    teacher: torch.Tensor       # [S] positions whose (detached) predictions are their targets

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 4D mask [1, 1, L, L] that transformers passes through as is: boolean (SDPA,
        any autocast dtype) or, for eager attention, additive in `additive_dtype`."""
        if additive_dtype is None:
            return self.allowed[None, None]
        mask = torch.zeros(self.allowed.shape, dtype=additive_dtype)
        mask.masked_fill_(~self.allowed, torch.finfo(additive_dtype).min)
        return mask[None, None]


def pack(prompt_ids: list[int], output_ids: list[int], segments: list[Segment]) -> Packed:
    p, t = len(prompt_ids), len(output_ids)
    clean = p + t
    offsets, at = [], clean
    for seg in segments:
        if seg.start < 0 or seg.start + len(seg.tokens) > t:
            raise ValueError(f"segment at {seg.start} of length {len(seg.tokens)} leaves the "
                             f"output of length {t}")
        offsets.append(at)
        at += len(seg.tokens)
    ids = list(prompt_ids) + list(output_ids)
    positions = list(range(clean))
    allowed = torch.zeros(at, at, dtype=torch.bool)
    allowed[:clean, :clean] = torch.ones(clean, clean, dtype=torch.bool).tril()
    student, teacher = [], []
    for seg, off in zip(segments, offsets):
        n = len(seg.tokens)
        ids += seg.tokens
        positions += range(p + seg.start, p + seg.start + n)
        allowed[off: off + n, : p + seg.start] = True
        allowed[off: off + n, off: off + n] = torch.ones(n, n, dtype=torch.bool).tril()
        if seg.student:
            student += range(off, off + n)
            teacher += _targets(seg, segments, offsets, p)
    return Packed(torch.tensor(ids), torch.tensor(positions), allowed, p, clean,
                  torch.tensor(student, dtype=torch.long), torch.tensor(teacher, dtype=torch.long))


def _targets(seg: Segment, segments: list[Segment], offsets: list[int], p: int) -> range:
    n = len(seg.tokens)
    if seg.target is None:
        return range(p + seg.start, p + seg.start + n)
    other = segments[seg.target]
    if other.start != seg.start or len(other.tokens) != n:
        raise ValueError("a local-consistency target must be a state of the same block")
    return range(offsets[seg.target], offsets[seg.target] + n)


def packed_logits(model, packed: Packed) -> torch.Tensor:
    """One forward over the packed sequence: logits [L, V]."""
    param = next(model.parameters())
    eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    mask = packed.attention_mask(param.dtype if eager else None).to(param.device)
    device = param.device
    out = model(input_ids=packed.input_ids[None].to(device), attention_mask=mask,
                position_ids=packed.position_ids[None].to(device), use_cache=False)
    return out.logits[0]

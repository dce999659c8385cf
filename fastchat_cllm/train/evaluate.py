"""Measure a (CLLM or plain) model on word problems: speed of Jacobi decoding and quality.

Per problem, interleaved so that machine noise hits every method alike: `model.generate`
greedy (the AR baseline and the quality reference), the engine's default adaptive Jacobi
decoding (prompt-lookup guesses included, as by default), and the reference's fixed blocks
(block_size, random initial guesses).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..bench.methods import Target, decoder, timed
from ..core import jacobi_generate
from ..core.stats import tokens_per_forward
from .problems import Problem, is_correct
from .trajectory import REFERENCE_BLOCKS

AR = decoder("ar")     # the benchmark's autoregressive baseline: transformers generate, greedy


@dataclass
class Evaluation:
    """Totals over the problems; `outputs` are the greedy outputs (token ids) by problem id."""

    problems: int = 0
    tokens: int = 0             # AR greedy tokens
    ar_seconds: float = 0.0
    adaptive_tokens: int = 0
    adaptive_seconds: float = 0.0
    adaptive_accepted: int = 0
    adaptive_forwards: int = 0
    fixed_accepted: int = 0
    fixed_forwards: int = 0
    correct: int = 0
    identical: int = 0          # greedy output equal to the teacher's
    lossless: int = 0           # Jacobi output equal to this model's own greedy output
    outputs: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = max(1, self.problems)
        ar_rate = self.tokens / self.ar_seconds if self.ar_seconds else 0.0
        jacobi_rate = (self.adaptive_tokens / self.adaptive_seconds
                       if self.adaptive_seconds else 0.0)
        return {
            "tpf_fixed": tokens_per_forward(self.fixed_accepted, self.fixed_forwards),
            "tpf_adaptive": tokens_per_forward(self.adaptive_accepted, self.adaptive_forwards),
            "ar_tokens_per_s": ar_rate,
            "jacobi_tokens_per_s": jacobi_rate,
            "speedup": jacobi_rate / ar_rate if ar_rate else 0.0,
            "accuracy": 100.0 * self.correct / n,
            "identical_to_teacher": 100.0 * self.identical / n,
            "lossless": 100.0 * self.lossless / n,
        }


def evaluate(model, tokenizer, problems: list[Problem], prompt_ids: dict, teacher: dict | None,
             max_new_tokens: int, block_size: int = 16, progress: bool = True) -> Evaluation:
    """prompt_ids: problem id -> token ids; teacher: problem id -> the base model's greedy
    output (None: this model is the teacher)."""
    from tqdm import tqdm

    eos = [tokenizer.eos_token_id]
    result = Evaluation()
    for problem in tqdm(problems, desc="evaluate", unit="problem", disable=not progress):
        ids = prompt_ids[problem.id]
        target = Target(ids, max_new_tokens, tuple(eos), eos[0])
        ar, ar_s = timed(model, lambda: AR(model, target).tokens)
        adaptive, adaptive_s = timed(model, lambda: jacobi_generate(
            model, ids, max_new_tokens=max_new_tokens, window_size=block_size, eos_token_id=eos))
        fixed = jacobi_generate(model, ids, max_new_tokens=max_new_tokens, window_size=block_size,
                                eos_token_id=eos, **REFERENCE_BLOCKS)
        result.problems += 1
        result.tokens += len(ar)
        result.ar_seconds += ar_s
        result.adaptive_tokens += len(adaptive.tokens)
        result.adaptive_seconds += adaptive_s
        result.adaptive_accepted += sum(adaptive.stats.accepted_per_forward)
        result.adaptive_forwards += adaptive.stats.forwards
        result.fixed_accepted += sum(fixed.stats.accepted_per_forward)
        result.fixed_forwards += fixed.stats.forwards
        result.correct += is_correct(tokenizer.decode(ar, skip_special_tokens=True), problem.answer)
        result.identical += teacher is None or teacher[problem.id] == ar
        result.lossless += adaptive.tokens == ar
        result.outputs[problem.id] = ar
    return result

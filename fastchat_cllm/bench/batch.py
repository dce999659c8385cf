"""The `batch[-wN][-pool][-nolookup]` methods: every prompt decoded together on one batched engine.

All N prompts go into one `core.engine.Engine` with N slots (every prompt prefilled in the
first step's forward), and the engine steps until every request has finished. Its one-by-one
counterpart is the `jacobi[-wN][-pool][-nolookup]` method of the same options, which runs each
prompt alone on an engine of one slot (where prompt lookup may also widen its windows); the
offline benchmark runs both (adding the counterpart when it was not asked for) and reports aggregate tokens/s, forwards, tokens per forward of the batch and how
many batched outputs equal their solo ones.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from ..core.engine import Engine
from ..core.stats import tokens_per_forward
from .methods import Run, Target, counting_forwards, jacobi_config, timed

NAME = re.compile(r"^batch((?:-w\d+)?(?:-pool)?(?:-nolookup)?)$")


def is_batch(name: str) -> bool:
    return bool(NAME.match(name))


def solo_method(name: str) -> str:
    """The one-by-one method with the same engine options: batch-w4 -> jacobi-w4."""
    match = NAME.match(name)
    if not match:
        raise ValueError(f"unknown batch method {name!r}: use batch, batch-wN, batch[-wN]-pool "
                         "or batch[-wN][-pool]-nolookup")
    return "jacobi" + match[1]


@dataclass(frozen=True)
class BatchRun:
    """One timed batch: the outputs in prompt order; `model_calls` counts every forward of the
    engine (the N prefills are the first N)."""

    outputs: list[list[int]]
    seconds: float
    model_calls: int


def batch_decode(name: str, model, targets: list[Target]) -> BatchRun:
    """Decode every target at once on one engine (a slot each), timed from the engine's
    construction (its cache allocation, as a one-by-one call pays it too) to the last step."""
    config = jacobi_config(solo_method(name))
    length = max(len(t.ids) + t.max_new_tokens for t in targets)
    outputs: dict[int, list[int]] = {}

    def run() -> None:
        engine = Engine(model, slots=len(targets), max_len=length,
                        chunk=sum(len(t.ids) for t in targets))   # every prefill in step 1
        for t in targets:
            outputs[engine.add(t.ids, config.with_(max_new_tokens=t.max_new_tokens,
                                                   eos_token_id=t.eos_token_id))] = []
        while engine.has_work:
            for request_id, step in engine.step():
                if getattr(step, "error", None) is not None:   # a request the engine failed
                    raise RuntimeError(f"batch request {request_id} failed") from step.error
                outputs[request_id].extend(step.tokens)

    with counting_forwards(model) as count:
        _, seconds = timed(model, run)
    return BatchRun([outputs[i] for i in sorted(outputs)], seconds, count[0])


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 3) if seconds > 0 else 0.0


def _per_forward(tokens: int, calls: int, prefills: int) -> float | None:
    """core.stats.tokens_per_forward with `prefills` forwards and their first tokens left out."""
    return round(tokens_per_forward(tokens - prefills, calls - prefills), 4) \
        if calls > prefills else None


def batch_record(name: str, run: BatchRun, solo: list[Run], ar: list[Run], repeat: int) -> dict:
    """The batch against the same repeat's one-by-one runs (`solo`, `ar`: the counterpart's
    and AR's, in prompt order)."""
    n, tokens = len(run.outputs), sum(map(len, run.outputs))
    solo_tokens = sum(len(r.tokens) for r in solo)
    solo_seconds = sum(r.seconds for r in solo)
    solo_calls = sum(r.model_calls for r in solo)
    rate, solo_rate = _rate(tokens, run.seconds), _rate(solo_tokens, solo_seconds)
    return {
        "method": name, "one_by_one": solo_method(name), "repeat": repeat, "prompts": n,
        "slots": n, "tokens": tokens, "seconds": round(run.seconds, 5),
        "tokens_per_second": rate, "model_calls": run.model_calls,
        "tokens_per_forward": _per_forward(tokens, run.model_calls, n),
        "one_by_one_tokens": solo_tokens, "one_by_one_seconds": round(solo_seconds, 5),
        "one_by_one_tokens_per_second": solo_rate, "one_by_one_model_calls": solo_calls,
        "one_by_one_tokens_per_forward": _per_forward(solo_tokens, solo_calls, n),
        "speedup_vs_one_by_one": round(rate / solo_rate, 4) if solo_rate else None,
        "identical_to_one_by_one": sum(out == r.tokens for out, r in zip(run.outputs, solo)),
        "identical_to_ar": sum(out == r.tokens for out, r in zip(run.outputs, ar)),
    }


def summarize_batches(records: list[dict], names: list[str]) -> dict[str, dict]:
    """Per batch method: medians over repeats of the aggregate rates and speedup; forwards
    and identical outputs summed."""
    out = {}
    for name in names:
        mine = [r for r in records if r["method"] == name]
        total = sum(r["prompts"] for r in mine)
        same = sum(r["identical_to_one_by_one"] for r in mine)

        def median(key: str):
            values = [r[key] for r in mine if r[key] is not None]
            return round(statistics.median(values), 4) if values else None

        out[name] = {
            "one_by_one": solo_method(name), "runs": len(mine), "prompts": mine[0]["prompts"],
            "tokens": sum(r["tokens"] for r in mine),
            "tokens_per_second": median("tokens_per_second"),
            "one_by_one_tokens_per_second": median("one_by_one_tokens_per_second"),
            "speedup_vs_one_by_one": median("speedup_vs_one_by_one"),
            "model_calls": sum(r["model_calls"] for r in mine),
            "one_by_one_model_calls": sum(r["one_by_one_model_calls"] for r in mine),
            "tokens_per_forward": median("tokens_per_forward"),
            "one_by_one_tokens_per_forward": median("one_by_one_tokens_per_forward"),
            "identical_to_one_by_one": same,
            "identical_to_ar": sum(r["identical_to_ar"] for r in mine),
            "outputs": total, "lossless": same == total,
        }
    return out

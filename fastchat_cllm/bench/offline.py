"""Offline benchmark: every method in one process on the same prompts, interleaved per prompt.

After a warm-up, each repeat runs every prompt with every method back to back (the method order
rotates from prompt to prompt), so slow drifts of a shared machine hit all methods alike; speedups
are ratios to `ar` on the same prompt and repeat, then the median. The `batch` methods
(batch.py) decode all prompts together once per repeat, after that repeat's prompts, and are
compared with the same repeat's one-by-one runs of their `jacobi` counterpart.
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass

from ..core.stats import tokens_per_forward
from .batch import batch_decode, batch_record, is_batch, solo_method, summarize_batches
from .methods import Decoder, Run, Target, decoder, timed_run
from .prompts import Prompt, encode

DEFAULT_METHODS = ("ar", "jacobi", "jacobi-w4", "jacobi-w16", "jacobi-nocache", "pld")
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class OfflineConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    max_new_tokens: int = 128
    repeats: int = 1

    def __post_init__(self):
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct and non-empty, got {self.methods}")
        if self.max_new_tokens < 1 or self.repeats < 1:
            raise ValueError("max_new_tokens and repeats must be >= 1")
        needed = ["ar"] + [solo_method(m) for m in self.methods if is_batch(m)]
        missing = tuple(dict.fromkeys(m for m in needed if m not in self.methods))
        if missing:  # AR: the reference of speedups and losslessness; a batch's one-by-one twin
            object.__setattr__(self, "methods", missing + tuple(self.methods))

    @property
    def solo(self) -> tuple[str, ...]:
        """The methods that decode one prompt at a time."""
        return tuple(m for m in self.methods if not is_batch(m))

    @property
    def batches(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if is_batch(m))

    def as_dict(self) -> dict:
        return {**asdict(self), "methods": list(self.methods)}


def stop_tokens(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """(EOS ids from the tokenizer and the generation config, a pad id)."""
    eos = model.generation_config.eos_token_id
    ids = [tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])
    eos_ids = tuple(dict.fromkeys(int(t) for t in ids if t is not None))
    pad = tokenizer.pad_token_id
    return eos_ids, int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, desc="bench", unit="run", dynamic_ncols=True)


def run_offline(config: OfflineConfig, model, tokenizer, prompts: list[Prompt], draft=None) -> dict:
    """Run the benchmark; returns {"prompts", "runs", "methods"} (JSON-ready), and with batch
    methods also {"batch_runs", "batches"}."""
    decoders = {name: decoder(name, draft) for name in config.solo}
    eos, pad = stop_tokens(model, tokenizer)
    targets = [Target(encode(tokenizer, p), config.max_new_tokens, eos, pad) for p in prompts]
    warm = [Target(t.ids, min(WARMUP_TOKENS, config.max_new_tokens), eos, pad) for t in targets]
    for decode in decoders.values():
        timed_run(decode, model, warm[0])
    for name in config.batches:
        batch_decode(name, model, warm)
    runs, batch_runs = [], []
    steps = len(prompts) * len(decoders) + len(config.batches)
    with _progress(config.repeats * steps) as bar:
        for repeat in range(config.repeats):
            solo = [_one_prompt(decoders, model, target, index, bar)
                    for index, target in enumerate(targets)]
            runs += [_record(name, results[name], results["ar"], index, repeat)
                     for index, results in enumerate(solo) for name in decoders]
            for name in config.batches:
                bar.set_postfix_str(f"{name} of {len(targets)}")
                batch_runs.append(batch_record(name, batch_decode(name, model, targets),
                                               [r[solo_method(name)] for r in solo],
                                               [r["ar"] for r in solo], repeat))
                bar.update()
    out = {
        "prompts": [{"name": p.name, "category": p.category, "prompt_tokens": len(t.ids)}
                    for p, t in zip(prompts, targets)],
        "runs": runs,
        "methods": summarize(runs, config.solo),
    }
    if config.batches:
        out.update(batch_runs=batch_runs, batches=summarize_batches(batch_runs, config.batches))
    return out


def _one_prompt(decoders: dict[str, Decoder], model, target: Target, index: int,
                bar) -> dict[str, Run]:
    """Every method on one prompt, the order rotated by the prompt index."""
    names = list(decoders)
    shift = index % len(names)
    results: dict[str, Run] = {}
    for name in names[shift:] + names[:shift]:
        bar.set_postfix_str(f"prompt {index} {name}")
        results[name] = timed_run(decoders[name], model, target)
        bar.update()
    return results


def _rate(run: Run) -> float:
    return len(run.tokens) / run.seconds if run.seconds > 0 else 0.0


def _record(name: str, run: Run, ar: Run, index: int, repeat: int) -> dict:
    return {
        "method": name, "prompt": index, "repeat": repeat, "tokens": len(run.tokens),
        "seconds": round(run.seconds, 5), "tokens_per_second": round(_rate(run), 3),
        "model_calls": run.model_calls, "fast_forwarded": run.fast_forwarded,
        "stationary": run.stationary, "identical_to_ar": run.tokens == ar.tokens,
        "speedup": round(_rate(run) / _rate(ar), 4) if _rate(ar) else None,
    }


def _total(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _pooled_rates(mine: list[dict]) -> dict:
    """Tokens per forward (core.stats.tokens_per_forward: the prefill's call and its token left
    out of every run) and tokens per model call (all calls, the prefill included), pooled."""
    tokens, calls = sum(r["tokens"] for r in mine), sum(r["model_calls"] for r in mine)
    after_prefill = calls - len(mine)
    return {
        "tokens_per_forward": round(tokens_per_forward(tokens - len(mine), after_prefill), 4)
        if after_prefill > 0 else None,
        "tokens_per_model_call": round(tokens / calls, 4) if calls else None,
    }


def summarize(runs: list[dict], methods: tuple[str, ...]) -> dict[str, dict]:
    """Per method: medians of tokens/s and of per-prompt speedups, pooled tokens per forward and
    per model call, total fast-forwarded and stationary tokens, how many outputs equal AR's."""
    out = {}
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        tokens = sum(r["tokens"] for r in mine)
        speedups = [r["speedup"] for r in mine if r["speedup"] is not None]
        identical = sum(r["identical_to_ar"] for r in mine)
        out[name] = {
            "runs": len(mine),
            "tokens": tokens,
            "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in mine), 3),
            "speedup_vs_ar": round(statistics.median(speedups), 4) if speedups else None,
            **_pooled_rates(mine),
            "fast_forwarded": _total(r["fast_forwarded"] for r in mine),
            "stationary": _total(r["stationary"] for r in mine),
            "identical_to_ar": identical,
            "lossless": identical == len(mine),
        }
    return out

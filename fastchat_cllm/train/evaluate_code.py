"""Measure a CLLM beside its base model on held-out HumanEval prompts: speed and quality.

python -m fastchat_cllm.train.evaluate_code --model smollm2-135m-cllm \
    [--base smollm2-135m-instruct] [--count 20] [--max-new-tokens 256] [--window-size 16] \
    [--out runs/evaluate-code]

Per prompt and model: the greedy output (transformers generate: the AR baseline and the
reference), Jacobi decoding with a sliding window of W (adaptive=False) on Jacobi's own guesses
and, with --prompt-lookup N (default 3; 0: off), on prompt-lookup guesses too, the engine's
adaptive default (windows up to W; prompt lookup as --prompt-lookup says), Jacobi sampling
(T 0.7, top-p 0.9, sliding window of W, both kinds of guesses), teacher-forced agreement (one
forward over the prompt and the base model's greedy output: how often this model's argmax is
the base's token), and HumanEval pass@1 of the greedy reply (humaneval.py). Records are appended
per prompt to OUT/<model>-<key>-n<N>-w<W>[-packed][-lN].jsonl (the key changes with the
model's files), so a rerun resumes and the base model, the teacher, is measured once.
OUT/results.json and OUT/results.md hold the summary, base beside CLLM. CPU fp32 unless
--device cuda.

--pass-at-1-only: per prompt and model one decode, the engine's default (adaptive windows up to
W, prompt lookup as --prompt-lookup says; lossless, so the model's greedy reply), its HumanEval
check, whether the reply is the base's, and the teacher-forced agreement on the base's reply
(one forward); cheap enough for all 164 problems (--count 0), where
the 2-point resolution of a pass@1 comparison needs more prompts than the full table can afford.
Records in OUT/<model>-...-pass.jsonl (resumed), summary in OUT/pass-at-1.json / .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import loading
from ..jsonl import jsonl_writer, read_jsonl
from .collect import eos_ids, first_line
from .trajectory import tokenizer_identity

ROWS = (   # (summary key, label); percentages are of prompts unless said
    ("tpf_sliding", "tokens per forward, sliding window of {w} (greedy, Jacobi's own guesses)"),
    ("tpf_sliding_lookup", "tokens per forward, sliding window of {w}, prompt lookup {l} (greedy)"),
    ("tpf_adaptive", "tokens per forward, adaptive engine (default, windows up to {w}{lookup})"),
    ("tpf_sampled", "tokens per forward, sampling T 0.7 top-p 0.9 (sliding window of {w})"),
    ("tpf_sampled_lookup", "tokens per forward, sampling T 0.7 top-p 0.9 (sliding {w}, "
                           "prompt lookup {l})"),
    ("sampled_vs_greedy", "sampling / greedy tokens per forward (%)"),
    ("sampled_vs_greedy_lookup", "sampling / greedy tokens per forward, prompt lookup {l} (%)"),
    ("agreement", "teacher-forced agreement with the base's greedy tokens (% of positions)"),
    ("identical_to_teacher", "greedy output identical to the base's (%)"),
    ("pass_at_1", "HumanEval pass@1, greedy (%)"),
    ("lossless_sliding", "Jacobi output == own greedy, sliding window (%)"),
    ("lossless_sliding_lookup", "Jacobi output == own greedy, sliding window, prompt lookup (%)"),
    ("lossless_adaptive", "Jacobi output == own greedy, adaptive (%)"),
    ("speedup_sliding", "wall-clock vs generate, sliding window (x)"),
    ("speedup_sliding_lookup", "wall-clock vs generate, sliding window, prompt lookup (x)"),
    ("speedup_adaptive", "wall-clock vs generate, adaptive (x)"),
    ("mean_output_tokens", "mean greedy output (tokens)"),
)


PASS_ROWS = (
    ("pass_at_1", "HumanEval pass@1, greedy reply of the default engine (%)"),
    ("passed", "problems passed"),
    ("identical_to_teacher", "greedy reply identical to the base's (%)"),
    ("agreement", "teacher-forced agreement with the base's greedy tokens (% of positions)"),
    ("tpf_adaptive", "tokens per forward, adaptive engine (default, windows up to {w}{lookup})"),
    ("mean_output_tokens", "mean greedy reply (tokens)"),
)


# the Jacobi runs of a record; the last two only with --prompt-lookup N > 0
RUNS = ("sliding", "adaptive", "sampled", "sliding_lookup", "sampled_lookup")


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    window_size: int = 16
    temperature: float = 0.7
    top_p: float = 0.9
    timeout: float = 10.0          # seconds per HumanEval check
    seed: int = 0
    prompt_lookup: int = 3         # 0: no prompt-lookup runs, the adaptive engine without it

    @property
    def runs(self) -> tuple[str, ...]:
        return RUNS if self.prompt_lookup else RUNS[:3]


def model_key(path: str) -> str:
    """A short digest of the model's name and its files' sizes and times (a retrained adapter
    gets a new record file)."""
    source = loading.resolve(path)
    files = [source.folder / source.gguf_file] if source.gguf_file else (
        sorted(f for f in source.folder.iterdir() if f.is_file()) if source.folder.is_dir() else [])
    stamp = [loading.base_name(path), [(f.name, f.stat().st_size, int(f.stat().st_mtime))
                                       for f in files]]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:8]


def packed_on(device: str) -> bool:
    """Whether this module's models run on prepacked weights on `device` (CPU, fp32)."""
    import torch

    from ..core.packed_linear import refusal

    return refusal(device, torch.float32) is None


def records_path(out: Path, path: str, settings: Settings, packed: bool = False,
                 kind: str = "") -> Path:
    """The record file of `path` under `settings`; `packed`: measured on prepacked weights
    (timings and near-ties differ from the plain model's, so the records are kept apart);
    `kind`: "pass" for --pass-at-1-only's records."""
    name = re.sub(r"[^\w.-]+", "_", loading.model_name(path))
    size, window = settings.max_new_tokens, settings.window_size
    lookup = f"-l{settings.prompt_lookup}" if settings.prompt_lookup else ""
    return out / (f"{name}-{model_key(path)}-n{size}-w{window}{'-packed' if packed else ''}"
                  f"{lookup}{f'-{kind}' if kind else ''}.jsonl")


def teacher_forced(model, prompt: list[int], teacher: list[int]) -> int:
    """Positions where the model's argmax, given the prompt and teacher[:i], is teacher[i]."""
    import torch

    if not teacher:
        return 0
    with torch.inference_mode():
        ids = torch.tensor([prompt + teacher], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1]          # [T, V]
    return int((logits.argmax(-1).cpu() == torch.tensor(teacher)).sum())


def prompt_and_config(tokenizer, problem: dict, s: Settings):
    """The problem's chat prompt ids and the engine's default config for it (adaptive windows
    up to W, prompt lookup as set)."""
    from ..chat_prompt import chat_prompt_ids
    from ..core import JacobiConfig

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": problem["prompt"]}])
    return ids, JacobiConfig(s.max_new_tokens, s.window_size, eos_ids(tokenizer), seed=s.seed,
                             prompt_lookup=s.prompt_lookup)


def checked_reply(tokenizer, tokens: list[int], problem: dict, s: Settings) -> dict:
    """The reply's text, its HumanEval check and the tokenizer's identity, for a record."""
    from .humaneval import pass_at_1

    reply = tokenizer.decode(tokens, skip_special_tokens=True)
    check = pass_at_1(reply, problem, s.timeout)
    return {"reply": reply, "passed": check.passed, "check": check.result,
            "tokenizer": tokenizer_identity(tokenizer)}


def measure(model, tokenizer, problem: dict, teacher: list[int] | None, s: Settings) -> dict:
    """One prompt's record (teacher None: this model is the teacher)."""
    from ..bench.methods import Target, decoder, timed
    from ..core import jacobi_generate

    ids, adaptive = prompt_and_config(tokenizer, problem, s)
    eos = list(adaptive.eos_token_id)
    greedy, greedy_s = timed(model, lambda: decoder("ar")(
        model, Target(ids, s.max_new_tokens, eos, eos[0])).tokens)
    sliding = adaptive.with_(adaptive=False, prompt_lookup=0)
    sampled = sliding.with_(temperature=s.temperature, top_p=s.top_p)
    runs = {"sliding": sliding, "adaptive": adaptive, "sampled": sampled,
            "sliding_lookup": sliding.with_(prompt_lookup=s.prompt_lookup),
            "sampled_lookup": sampled.with_(prompt_lookup=s.prompt_lookup)}
    runs = {name: runs[name] for name in s.runs}
    record = {"id": problem["id"], "prompt_tokens": len(ids), "greedy": greedy,
              "greedy_seconds": greedy_s}
    for name, config in runs.items():
        out, seconds = timed(model, lambda: jacobi_generate(model, ids, config))
        record[name] = {"tokens": len(out.tokens), "accepted": sum(out.stats.accepted_per_forward),
                        "forwards": out.stats.forwards, "seconds": seconds,
                        "lossless": out.tokens == greedy}
    reference = greedy if teacher is None else teacher
    record["agreement"] = [teacher_forced(model, ids, reference), len(reference)]
    record["identical_to_teacher"] = greedy == reference
    return {**record, **checked_reply(tokenizer, greedy, problem, s)}


def measure_reply(model, tokenizer, problem: dict, teacher: list[int] | None,
                  s: Settings) -> dict:
    """One prompt's record for --pass-at-1-only: the reply of the engine's default decoding
    (greedy; equal to transformers' greedy output wherever the full evaluation measured it,
    its lossless_adaptive), its HumanEval check, whether it is the base's reply (`teacher`),
    and the teacher-forced agreement on that (one more forward)."""
    from ..core import jacobi_generate

    ids, config = prompt_and_config(tokenizer, problem, s)
    out = jacobi_generate(model, ids, config)
    reference = out.tokens if teacher is None else teacher
    return {"id": problem["id"], "greedy": out.tokens,
            "identical_to_teacher": out.tokens == reference,
            "agreement": [teacher_forced(model, ids, reference), len(reference)],
            "adaptive": {"accepted": sum(out.stats.accepted_per_forward),
                         "forwards": out.stats.forwards},
            **checked_reply(tokenizer, out.tokens, problem, s)}


def evaluate_model(path: str, problems: list[dict], out: Path, s: Settings,
                   teacher: dict | None, device: str, pass_only: bool = False) -> list[dict]:
    """This model's records for `problems`, measuring only those not yet in its record file
    (teacher: problem id -> the base's record; None for the base itself). `pass_only`: the
    records of --pass-at-1-only (measure_reply), in their own file."""
    import torch
    from tqdm import tqdm

    from ..core.packed_linear import is_packed

    def records(packed: bool) -> tuple[Path, dict, list[dict]]:
        file = records_path(out, path, s, packed, "pass" if pass_only else "")
        done = {r["id"]: {"packed_linear": packed, **r}
                for r in read_jsonl(file, torn_end=True)} if file.exists() else {}
        return file, done, [p for p in problems if p["id"] not in done]

    expected = packed_on(device)
    file, done, todo = records(expected)
    if todo:
        model, tokenizer = loading.load(path, dtype=torch.float32, device=device, pack=True)
        if is_packed(model) != expected:               # oneDNN refused this model at load
            file, done, todo = records(is_packed(model))
        print(f"{path}: {len(todo)} prompts to measure ({file})", file=sys.stderr)
        if teacher is not None:
            theirs = next(iter(teacher.values()))["tokenizer"]
            if theirs != tokenizer_identity(tokenizer):
                raise ValueError(f"{path} has another tokenizer than the base model: "
                                 "teacher-forced agreement needs one")
        with jsonl_writer(file, append=True) as write:
            for problem in tqdm(todo, desc=loading.model_name(path), unit="prompt"):
                reference = None if teacher is None else teacher[problem["id"]]["greedy"]
                record = (measure_reply if pass_only else measure)(model, tokenizer, problem,
                                                                   reference, s)
                done[problem["id"]] = {**record, "packed_linear": is_packed(model)}
                write(done[problem["id"]])
    return [done[p["id"]] for p in problems]


def summarize(records: list[dict]) -> dict:
    from ..core.stats import tokens_per_forward

    def total(name: str, field: str) -> float:
        return sum(r[name][field] for r in records)

    def percent(count: float, of: float) -> float:
        return 100.0 * count / of if of else 0.0

    runs = [name for name in RUNS if name in records[0]]
    tpf = {name: tokens_per_forward(total(name, "accepted"), total(name, "forwards"))
           for name in runs}
    greedy_runs = [name for name in ("sliding", "adaptive", "sliding_lookup") if name in runs]
    lookup = {"sampled_vs_greedy_lookup": percent(tpf["sampled_lookup"], tpf["sliding_lookup"])
              } if "sampled_lookup" in runs else {}
    greedy_tokens = sum(len(r["greedy"]) for r in records)
    ar_rate = greedy_tokens / max(sum(r["greedy_seconds"] for r in records), 1e-9)
    n = len(records)
    return {
        "prompts": n, **{f"tpf_{name}": value for name, value in tpf.items()},
        "sampled_vs_greedy": percent(tpf["sampled"], tpf["sliding"]), **lookup,
        "agreement": percent(sum(r["agreement"][0] for r in records),
                             sum(r["agreement"][1] for r in records)),
        "identical_to_teacher": percent(sum(r["identical_to_teacher"] for r in records), n),
        "pass_at_1": percent(sum(r["passed"] for r in records), n),
        **{f"lossless_{name}": percent(sum(r[name]["lossless"] for r in records), n)
           for name in greedy_runs},
        **{f"speedup_{name}": total(name, "tokens") / max(total(name, "seconds"), 1e-9) / ar_rate
           for name in greedy_runs},
        "mean_output_tokens": greedy_tokens / n if n else 0.0,
    }


def summarize_replies(records: list[dict]) -> dict:
    """The summary of --pass-at-1-only's records."""
    from ..core.stats import tokens_per_forward

    n = max(len(records), 1)
    return {"prompts": len(records), "passed": sum(r["passed"] for r in records),
            "pass_at_1": 100.0 * sum(r["passed"] for r in records) / n,
            "identical_to_teacher": 100.0 * sum(r["identical_to_teacher"] for r in records) / n,
            "agreement": 100.0 * sum(r["agreement"][0] for r in records) / max(
                sum(r["agreement"][1] for r in records), 1),
            "tpf_adaptive": tokens_per_forward(sum(r["adaptive"]["accepted"] for r in records),
                                               sum(r["adaptive"]["forwards"] for r in records)),
            "mean_output_tokens": sum(len(r["greedy"]) for r in records) / n}


def verdicts(base: list[dict], model: list[dict]) -> dict:
    """How the two models' pass@1 verdicts compare, problem by problem."""
    pairs = [(b["passed"], m["passed"]) for b, m in zip(base, model)]
    return {"both": pairs.count((True, True)), "base_only": pairs.count((True, False)),
            "model_only": pairs.count((False, True)), "neither": pairs.count((False, False))}


def table(base: dict, model: dict, names: tuple[str, str], s: Settings, where: str,
          rows=ROWS) -> str:
    from ..bench.report import markdown_table

    header = [f"held-out HumanEval, {base['prompts']} prompts, {s.max_new_tokens} new tokens "
              f"({where})", f"base: {names[0]}", f"CLLM: {names[1]}"]
    words = {"w": s.window_size, "l": s.prompt_lookup,
             "lookup": f", prompt lookup {s.prompt_lookup}" if s.prompt_lookup else ", no lookup"}
    return markdown_table(header, [[label.format(**words), base[key], model[key]]
                                   for key, label in rows if key in base])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.evaluate_code",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the CLLM (path or alias)")
    p.add_argument("--base", default=loading.DEFAULT_MODEL, help="the base model, the teacher")
    p.add_argument("--count", type=int, default=20, help="first N HumanEval problems (0: all 164)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--prompt-lookup", type=int, default=3,
                   help="n-gram size of the prompt-lookup guesses (0: off; measured beside "
                        "Jacobi's own guesses, and on in the adaptive run)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per pass@1 check")
    p.add_argument("--out", type=Path, default=Path("runs/evaluate-code"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--pass-at-1-only", action="store_true",
                   help="only the greedy reply's pass@1 (one decode per prompt; see above)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ..bench.report import machine, machine_line
    from ..core import JacobiConfig
    from .code_prompts import held_out_prompts

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(args.max_new_tokens, args.window_size, timeout=args.timeout,
                 prompt_lookup=args.prompt_lookup)
    try:
        if args.count < 0 or args.max_new_tokens < 1 or args.window_size < 1:
            raise ValueError("--count must be >= 0, --max-new-tokens and --window-size >= 1")
        JacobiConfig(prompt_lookup=args.prompt_lookup)       # a bad size fails here
        problems = held_out_prompts()
        problems = problems[: args.count] if args.count else problems
        args.out.mkdir(parents=True, exist_ok=True)
        only = args.pass_at_1_only
        base = evaluate_model(args.base, problems, args.out, s, None, device, only)
        teacher = {r["id"]: r for r in base}
        model = base if loading.base_name(args.model) == loading.base_name(args.base) else \
            evaluate_model(args.model, problems, args.out, s, teacher, device, only)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    info, packed = machine(), all(r["packed_linear"] for r in base + model)
    summary = {"base": (summarize_replies if only else summarize)(base),
               "model": (summarize_replies if only else summarize)(model)}
    markdown = table(summary["base"], summary["model"], (args.base, args.model), s,
                     f"{device}, fp32" + (", weights prepacked" if packed else ""),
                     PASS_ROWS if only else ROWS)
    results = {"base": args.base, "model": args.model, "settings": asdict(s), "device": device,
               "packed_linear": packed, "machine": info,
               "prompts": [p["id"] for p in problems], **summary}
    if only:
        results["verdicts"] = verdicts(base, model)
        markdown += ("\n\nproblems passed by both: {both}, by the base only: {base_only}, by "
                     "the CLLM only: {model_only}, by neither: {neither}").format(
                         **results["verdicts"])
    name = "pass-at-1" if only else "results"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(f"{markdown}\n\nmachine: {machine_line(info)}\n")
    print(markdown)
    print(f"wrote {args.out / f'{name}.json'} and {args.out / f'{name}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

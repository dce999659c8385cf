"""Speed against quality along one distillation run: its adapter snapshots on held-out HumanEval.

python -m fastchat_cllm.train.tradeoff --snapshots OUT/snapshots [--base smollm2-135m-instruct] \
    [--count 8] [--skip 0] [--agreement-count 24] [--max-new-tokens 128] [--window-size 16] \
    [--scales 1,0.5] [--min-agreement 97] [--out runs/tradeoff]

For each snapshot (`distill --snapshot-every N` writes OUT/snapshots/step-N) and the base model:
tokens per forward with a sliding window (greedy, on Jacobi's own guesses: no prompt lookup,
whose gain from copying is alike for every snapshot), teacher-forced agreement with the base
model's greedy output, and greedy outputs identical to the base's. The base's greedy outputs
are evaluate_code's records (measured once, shared with `evaluate_code --prompt-lookup 0`).
Writes OUT/tradeoff.md and .json: the table from which a snapshot is picked (the one that keeps quality, issue 14). --scales also
measures each snapshot scaled down (a fraction of its change to the base, as `train.ship
--scale` ships it); --snapshots may also be one adapter folder. --skip K measures HumanEval
problems K .. K+count-1: pick the point on such a split and report it on others (evaluate_code's
first ones), so the reported numbers are not the ones it was picked on. --agreement-count M
measures agreement on M problems from K on, which steadies the pick; tokens per forward stays
on the first --count (a trained point's agreement costs one forward per prompt, its decode
many; the base's records, all M, are measured once and cached in --out). --min-agreement A picks
the point with the most tokens per forward among those with agreement >= A (marked in the
table, "pick" in the JSON, and the `train.ship` command that ships it is printed).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

from .. import loading
from .ship import write_adapter


def measure_snapshot(path: str, problems: list[dict], teacher: dict, window: int,
                     max_new_tokens: int, device: str, decoded: int | None = None) -> dict:
    """Sliding-window tokens per forward (on the first `decoded` problems; None: all) and
    agreement with the teacher (on all) of one model."""
    import torch
    from tqdm import tqdm

    from ..chat_prompt import chat_prompt_ids
    from ..core import JacobiConfig, jacobi_generate
    from ..core.stats import tokens_per_forward
    from .collect import eos_ids
    from .evaluate_code import teacher_forced

    model, tokenizer = loading.load(path, dtype=torch.float32, device=device, pack=True)
    eos = eos_ids(tokenizer)
    # Jacobi's own guesses: prompt lookup would add what copying gains, the same for any snapshot
    config = JacobiConfig(max_new_tokens, window, eos, adaptive=False, prompt_lookup=0)
    decoded = len(problems) if decoded is None else decoded
    accepted = forwards = agree = positions = identical = 0
    for i, problem in enumerate(tqdm(problems, desc=Path(path).name, unit="prompt")):
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": problem["prompt"]}])
        reference = teacher[problem["id"]]["greedy"]
        agree += teacher_forced(model, ids, reference)
        positions += len(reference)
        if i < decoded:
            out = jacobi_generate(model, ids, config)
            accepted += sum(out.stats.accepted_per_forward)
            forwards += out.stats.forwards
            identical += out.tokens == reference      # Jacobi is lossless: its greedy output
    return {"model": path, "tpf_sliding": tokens_per_forward(accepted, forwards),
            "agreement": 100.0 * agree / max(positions, 1),
            "identical_to_teacher": 100.0 * identical / max(decoded, 1)}


def step_of(path: Path) -> int:
    """N for distill's snapshot folder step-N, else -1."""
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match[1]) if match else -1


def pick(rows: list[dict], min_agreement: float) -> dict | None:
    """The trained point (not the base) with the most tokens per forward among those whose
    agreement is >= min_agreement; None when none keeps it."""
    kept = [r for r in rows if "snapshot" in r and r["agreement"] >= min_agreement]
    return max(kept, key=lambda r: r["tpf_sliding"], default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.tradeoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", type=Path, required=True,
                   help="distill's OUT/snapshots, or one adapter folder")
    p.add_argument("--base", default=loading.DEFAULT_MODEL)
    p.add_argument("--count", type=int, default=8, help="N HumanEval problems")
    p.add_argument("--skip", type=int, default=0, help="from problem K on (0: the first N)")
    p.add_argument("--agreement-count", type=int, default=0,
                   help="measure agreement on M problems from K on (0: --count; M >= --count)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="pick the most tokens per forward among points with agreement >= A (%%)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--scales", default="1", help="comma-separated adapter scales in (0, 1]")
    p.add_argument("--out", type=Path, default=Path("runs/tradeoff"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from .code_prompts import held_out_prompts
    from .collect import first_line
    from .evaluate_code import Settings, evaluate_model

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if not args.snapshots.is_dir():
            raise ValueError(f"{args.snapshots} is not a folder of snapshots")
        if (args.snapshots / loading.ADAPTER_CONFIG).exists():
            snapshots = [args.snapshots]
        else:
            snapshots = sorted((d for d in args.snapshots.iterdir() if d.is_dir()), key=step_of)
        if not snapshots:
            raise ValueError(f"no snapshots in {args.snapshots}")
        scales = [float(x) for x in args.scales.split(",")]
        if not all(0 < x <= 1 for x in scales):
            raise ValueError(f"--scales must lie in (0, 1], got {args.scales}")
        if args.count < 1 or args.skip < 0:
            raise ValueError("--count must be >= 1 and --skip >= 0")
        agreement_count = args.agreement_count or args.count
        if agreement_count < args.count:
            raise ValueError("--agreement-count must be >= --count")
        problems = held_out_prompts()[args.skip: args.skip + agreement_count]
        if len(problems) < agreement_count:
            raise ValueError(f"--skip {args.skip} with {agreement_count} problems runs past the "
                             f"{len(held_out_prompts())} HumanEval problems")
        args.out.mkdir(parents=True, exist_ok=True)
        settings = Settings(args.max_new_tokens, args.window_size, prompt_lookup=0)
        base = evaluate_model(args.base, problems, args.out, settings, None, device)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    teacher = {r["id"]: r for r in base}
    measure = dict(window=args.window_size, max_new_tokens=args.max_new_tokens, device=device,
                   decoded=args.count)
    rows = [measure_snapshot(args.base, problems, teacher, **measure)]
    rows[0]["model"] = f"base ({args.base})"
    for snapshot in snapshots:
        name = f"step {step_of(snapshot)}" if step_of(snapshot) >= 0 else snapshot.name
        for scale in scales:
            with tempfile.TemporaryDirectory() as scaled:
                path = snapshot if scale == 1 else write_adapter(snapshot, Path(scaled),
                                                                 scale=scale)
                rows.append(measure_snapshot(str(path), problems, teacher, **measure))
            rows[-1].update(model=name + (f" x {scale:g}" if scale != 1 else ""),
                            snapshot=str(snapshot), scale=scale)
    chosen = None if args.min_agreement is None else pick(rows, args.min_agreement)
    if chosen is not None:
        chosen["pick"] = True
    lines = table(rows, args, agreement_count, device)
    if chosen is not None:
        lines.append(f"\npick (most tokens per forward with agreement >= "
                     f"{args.min_agreement:g}%): {chosen['model']}; ship it with: python -m "
                     f"fastchat_cllm.train.ship {shlex.quote(chosen['snapshot'])} "
                     f"--scale {chosen['scale']!r} --dtype float16")
    elif args.min_agreement is not None:
        lines.append(f"\nno point keeps agreement >= {args.min_agreement:g}%")
    (args.out / "tradeoff.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def row_line(r: dict) -> str:
    name = f"**{r['model']}**" if r.get("pick") else r["model"]
    return f"| {name} | {r['tpf_sliding']:.2f} | {r['agreement']:.2f} | " \
           f"{r['identical_to_teacher']:.0f} |"


def table(rows: list[dict], args, agreement_count: int, device: str) -> list[str]:
    def span(n: int) -> str:
        return f"HumanEval problems {args.skip}-{args.skip + n - 1}"

    lines = [f"| held-out, {args.max_new_tokens} new tokens ({device}, fp32) | tokens per "
             f"forward (sliding {args.window_size}; {span(args.count)}) | agreement with base "
             f"(% positions; {span(agreement_count)}) | outputs identical to base (%; "
             f"{span(args.count)}) |",
             "|---|---|---|---|"]
    return lines + [row_line(r) for r in rows]


if __name__ == "__main__":
    sys.exit(main())

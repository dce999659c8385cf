"""Speed against quality along one distillation run: its adapter snapshots on held-out HumanEval.

python -m fastchat_cllm.train.tradeoff --snapshots OUT/snapshots [--base smollm2-135m-instruct] \
    [--count 8] [--skip 0] [--max-new-tokens 128] [--window-size 16] [--scales 1,0.5] \
    [--out runs/tradeoff]

For each snapshot (`distill --snapshot-every N` writes OUT/snapshots/step-N) and the base model:
tokens per forward with a sliding window (greedy), teacher-forced agreement with the base
model's greedy output, and greedy outputs identical to the base's. The base's greedy outputs
are evaluate_code's records (measured once, shared with it). Writes OUT/tradeoff.md and .json:
the table from which a snapshot is picked (the one that keeps quality, issue 14). --scales also
measures each snapshot scaled down (a fraction of its change to the base, as `train.ship
--scale` ships it); --snapshots may also be one adapter folder. --skip K measures HumanEval
problems K .. K+count-1: pick the point on such a split and report it on others (evaluate_code's
first ones), so the reported numbers are not the ones it was picked on.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from .. import loading
from .ship import write_adapter


def measure_snapshot(path: str, problems: list[dict], teacher: dict, window: int,
                     max_new_tokens: int, device: str) -> dict:
    """Sliding-window tokens per forward and agreement with the teacher of one model."""
    import torch
    from tqdm import tqdm

    from ..chat_prompt import chat_prompt_ids
    from ..core import JacobiConfig, jacobi_generate
    from ..core.stats import tokens_per_forward
    from .collect import eos_ids
    from .evaluate_code import teacher_forced

    model, tokenizer = loading.load(path, dtype=torch.float32, device=device)
    eos = eos_ids(tokenizer)
    config = JacobiConfig(max_new_tokens, window, eos, adaptive=False)
    accepted = forwards = agree = positions = identical = 0
    for problem in tqdm(problems, desc=Path(path).name, unit="prompt"):
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": problem["prompt"]}])
        out = jacobi_generate(model, ids, config)
        accepted += sum(out.stats.accepted_per_forward)
        forwards += out.stats.forwards
        reference = teacher[problem["id"]]["greedy"]
        agree += teacher_forced(model, ids, reference)
        positions += len(reference)
        identical += out.tokens == reference      # Jacobi is lossless: its greedy output
    return {"model": path, "tpf_sliding": tokens_per_forward(accepted, forwards),
            "agreement": 100.0 * agree / max(positions, 1),
            "identical_to_teacher": 100.0 * identical / max(len(problems), 1)}


def step_of(path: Path) -> int:
    match = re.search(r"(\d+)$", path.name)
    return int(match[1]) if match else -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.tradeoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", type=Path, required=True,
                   help="distill's OUT/snapshots, or one adapter folder")
    p.add_argument("--base", default=loading.DEFAULT_MODEL)
    p.add_argument("--count", type=int, default=8, help="N HumanEval problems")
    p.add_argument("--skip", type=int, default=0, help="from problem K on (0: the first N)")
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
        problems = held_out_prompts()[args.skip: args.skip + args.count]
        if len(problems) < args.count:
            raise ValueError(f"--skip {args.skip} --count {args.count} runs past the "
                             f"{len(held_out_prompts())} HumanEval problems")
        args.out.mkdir(parents=True, exist_ok=True)
        settings = Settings(args.max_new_tokens, args.window_size)
        base = evaluate_model(args.base, problems, args.out, settings, None, device)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    teacher = {r["id"]: r for r in base}
    rows = [measure_snapshot(args.base, problems, teacher, args.window_size,
                             args.max_new_tokens, device)]
    rows[0]["model"] = f"base ({args.base})"
    for snapshot in snapshots:
        name = f"step {step_of(snapshot)}" if step_of(snapshot) >= 0 else snapshot.name
        for scale in scales:
            with tempfile.TemporaryDirectory() as scaled:
                path = snapshot if scale == 1 else write_adapter(snapshot, Path(scaled),
                                                                 scale=scale)
                rows.append(measure_snapshot(str(path), problems, teacher, args.window_size,
                                             args.max_new_tokens, device))
            rows[-1].update(model=name + (f" x {scale:g}" if scale != 1 else ""),
                            snapshot=str(snapshot), scale=scale)
    which = f"problems {args.skip}-{args.skip + args.count - 1}" if args.skip else "prompts"
    lines = [f"| {args.count} held-out HumanEval {which}, {args.max_new_tokens} new tokens "
             f"({device}, fp32) | tokens per forward (sliding {args.window_size}) | "
             "agreement with base (% positions) | outputs identical to base (%) |",
             "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tpf_sliding']:.2f} | {r['agreement']:.1f} | "
              f"{r['identical_to_teacher']:.0f} |" for r in rows]
    (args.out / "tradeoff.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

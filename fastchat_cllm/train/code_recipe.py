"""Make a code CLLM of the default SmolLM2 end to end, the recipe of the shipped adapter.

python -m fastchat_cllm.train.code_recipe [--work runs/code-cllm] [--collect-minutes 70]
    [--collect-workers 2] [--distill-minutes 50] [--scales 1,0.8,0.7] [--dev-prompts 24]
    [--min-agreement 97] [--threads 1]

1. training prompts: every documented standard-library function, then every documented method
   of a public class, as a HumanEval-style stub (code_prompts.py: 652 + 803 on Python 3.11;
   HumanEval itself is held out),
2. Jacobi trajectories of the base model (`train.collect --workers 2` on a CPU: two processes
   of one thread; fixed blocks of 16 from random guesses, 128 new tokens, one augmented copy per
   state; all 1,455 prompts take about an hour on the 2-core CPU; one process on a GPU),
3. LoRA distillation with the frozen base as the teacher (`train.distill --teacher base`: rank 32,
   lr 2e-4 constant, AR weight 60 (KL to the base on the clean output), horizon 1 with 16 states
   per block: each noisy state trains the one position after its first wrong token, the one a
   sliding window accepts next), an adapter snapshot every 150 steps,
4. the speed/quality trade-off over the snapshots, each also at a few adapter scales
   (`train.tradeoff --scales`): tokens per forward on 8 held-out HumanEval problems from problem
   100 on, agreement with the base on 24 from there, a split kept apart from the first ones that
   `train.evaluate_code` reports; the pick is the point with the most tokens per forward among
   those that keep quality (agreement >= --min-agreement, 97%),
5. nothing is shipped by itself: the table marks the pick and prints its `train.ship` command
   (`python -m fastchat_cllm.train.ship WORK/distill/snapshots/step-N --scale S --dtype
   float16`); then measure it with `python -m fastchat_cllm.train.evaluate_code --model
   smollm2-135m-cllm`.
Every stage resumes (collect skips prompts done, distill continues from its checkpoint and does
nothing once its steps are done, the base model's records are reused), so rerunning the command
after an interruption continues. Collection is bounded by time: a rerun may add trajectories,
and distillation then continues on the larger set. The
time limits bound each stage: on the project's 2-core CPU the defaults take about 2 h 25 min
(collection about an hour of at most 70 min, distillation 50, the trade-off table ~25).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def run(module: str, *args) -> None:
    command = [sys.executable, "-m", module, *map(str, args)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.code_recipe",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/code-cllm"))
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--prompts", type=int, default=0, help="training prompts (0: all)")
    p.add_argument("--collect-minutes", type=float, default=70.0)
    p.add_argument("--collect-workers", type=int, default=2,
                   help="collection processes of --threads threads each (2 fill the 2-core CPU)")
    p.add_argument("--distill-minutes", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--snapshot-every", type=int, default=150)
    p.add_argument("--scales", default="1,0.8,0.7",
                   help="adapter scales the trade-off table measures")
    p.add_argument("--dev-prompts", type=int, default=24,
                   help="held-out problems (from 100 on) the pick's agreement is measured on")
    p.add_argument("--min-agreement", type=float, default=97.0,
                   help="the pick keeps at least this agreement with the base (%%)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 holds up best on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.dev_prompts <= 64:
        p.error("--dev-prompts must lie in 1..64 (HumanEval problems 100-163)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..jsonl import write_jsonl
    from .collect import _cuda
    from .code_prompts import training_prompts

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "train.jsonl"
    if not prompts.exists():
        write_jsonl(training_prompts(args.prompts, args.seed), prompts)
    model = ["--model", args.model] if args.model else []
    run("fastchat_cllm.train.collect", *model, "--prompts", prompts,
        "--out", work / "trajectories.jsonl", "--block-size", 16, "--max-new-tokens", 128,
        "--augment", 1, "--max-minutes", args.collect_minutes, "--threads", args.threads,
        "--workers", 1 if _cuda() else args.collect_workers, "--seed", args.seed)
    distilled = work / "distill"     # run every time: it continues from its checkpoint
    run("fastchat_cllm.train.distill", *model, "--trajectories", work / "trajectories.jsonl",
        "--out", distilled, "--lora-rank", 32, "--lora-alpha", 64, "--lr", 2e-4,
        "--schedule", "constant", "--warmup", 0.01, "--teacher", "base", "--ar-weight", 60,
        "--label-smoothing", 0, "--horizon", 1, "--states-per-block", 16, "--steps", args.steps,
        "--save-every", 20, "--snapshot-every", args.snapshot_every,
        "--max-minutes", args.distill_minutes, "--save-adapter", "--threads", args.threads,
        "--seed", args.seed)
    base = ["--base", args.model] if args.model else []
    run("fastchat_cllm.train.tradeoff", "--snapshots", distilled / "snapshots", *base,
        "--skip", 100, "--count", min(8, args.dev_prompts), "--agreement-count",
        args.dev_prompts, "--scales", args.scales, "--min-agreement", args.min_agreement,
        "--out", work / "tradeoff", "--threads", args.threads)
    print(f"the table and the pick: {work / 'tradeoff' / 'tradeoff.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make a SmolLM2-135M-Instruct CLLM on this machine, then compare it with the base model.

python examples/make_smollm2_cllm.py [--work /tmp/smollm2_cllm] [--train 400] [--held-out 24]
    [--collect-minutes 20] [--distill-minutes 34] [--threads 1]

1. writes the word-problem prompt set (fixed seed; train / held-out split),
2. measures the base model on the held-out problems (its greedy outputs are the teacher's),
3. collects Jacobi trajectories of the train prompts (`python -m fastchat_cllm.train.collect`),
4. distils (`python -m fastchat_cllm.train.distill`; full fine-tuning, fp32 on CPU, bf16 on GPU),
5. loads the result with fastchat_cllm.loading.load and measures it on the held-out problems,
6. prints before/after side by side (and writes results.json to --work).
Every stage resumes: rerunning the command skips finished work.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastchat_cllm.chat_prompt import chat_prompt_ids
from fastchat_cllm.loading import load
from fastchat_cllm.train.evaluate import evaluate
from fastchat_cllm.jsonl import write_jsonl
from fastchat_cllm.train.problems import make_problems

ROWS = (("tokens per forward, fixed blocks of 16 (reference)", "tpf_fixed", "{:.2f}"),
        ("tokens per forward, adaptive engine (default)", "tpf_adaptive", "{:.2f}"),
        ("wall-clock speedup over model.generate (adaptive)", "speedup", "{:.2f}x"),
        ("answer accuracy (%)", "accuracy", "{:.1f}"),
        ("outputs identical to the teacher's greedy (%)", "identical_to_teacher", "{:.1f}"),
        ("Jacobi output == own greedy output (%)", "lossless", "{:.1f}"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/smollm2_cllm", help="folder for every artefact")
    p.add_argument("--train", type=int, default=400, help="training prompts (at most)")
    p.add_argument("--held-out", type=int, default=24, help="held-out prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--collect-minutes", type=float, default=20.0, help="time budget of collection")
    p.add_argument("--distill-minutes", type=float, default=34.0, help="time budget of training")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 is fastest on a crowded shared CPU)")
    p.add_argument("--steps", type=int, default=180, help="optimizer steps (cosine schedule)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ar-weight", type=float, default=1.0)
    p.add_argument("--states-per-block", type=int, default=8)
    p.add_argument("--augment", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(module: str, *args) -> None:
    command = [sys.executable, "-m", module, *map(str, args)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def measure(path, problems, teacher, args, label: str) -> tuple[dict, dict]:
    """(summary, greedy outputs by id) of the model at `path` on the held-out problems."""
    model, tokenizer = load(path, dtype=torch.float32, device=device())
    ids = {p.id: chat_prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}])
           for p in problems}
    started = time.monotonic()
    result = evaluate(model, tokenizer, problems, ids, teacher, args.max_new_tokens,
                      args.block_size)
    summary = result.summary()
    print(f"{label}: {json.dumps({k: round(v, 3) for k, v in summary.items()})} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return summary, result.outputs


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def table(before: dict, after: dict) -> str:
    lines = [f"| held-out ({device()}, fp32) | base SmolLM2-135M | CLLM |", "|---|---|---|"]
    for name, key, fmt in ROWS:
        lines.append(f"| {name} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = make_problems(args.train, args.held_out, args.seed)
    write_jsonl(map(asdict, train), work / "train.jsonl")
    write_jsonl(map(asdict, held_out), work / "held_out.jsonl")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    if "before" not in results:
        results["before"], results["teacher"] = measure(None, held_out, None, args, "base")
        results_path.write_text(json.dumps(results))
    run("fastchat_cllm.train.collect", "--prompts", work / "train.jsonl",
        "--out", work / "trajectories.jsonl", "--block-size", args.block_size,
        "--max-new-tokens", args.max_new_tokens, "--augment", args.augment, "--seed", args.seed,
        "--max-minutes", args.collect_minutes, "--threads", args.threads)
    model_dir = work / "cllm"
    if not (model_dir / "config.json").exists():
        run("fastchat_cllm.train.distill", "--trajectories", work / "trajectories.jsonl",
            "--out", model_dir, "--steps", args.steps, "--lr", args.lr,
            "--ar-weight", args.ar_weight, "--states-per-block", args.states_per_block,
            "--max-minutes", args.distill_minutes, "--save-every", 50, "--seed", args.seed,
            "--threads", args.threads)
    results["after"], _ = measure(str(model_dir), held_out, results["teacher"], args, "CLLM")
    results_path.write_text(json.dumps(results))
    print(table(results["before"], results["after"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
